"""gevent after ``monkey.patch_all()``: gevent's socket class (not a stdlib subclass) is counted
like the stdlib's, at the app's lines; the event loop is not starved by the agent; exit is quiet
(the agent's threads started before the patch end without threading errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import last_json, run, snapshot_files, totals, write_app

pytest.importorskip("gevent")

GEVENT_APP = '''\
from gevent import monkey; monkey.patch_all()
import json, os, sys, time
import gevent, socket
if sys.argv[1] == "enable":
    import connwatch
    connwatch.enable()  # started after the patch: its writer is a greenlet

srv = socket.create_server(("127.0.0.1", 0), backlog=1024)  # MARK:listener
ADDR = srv.getsockname()
accepted = [0]

def acceptor():
    while True:
        c, _ = srv.accept()  # MARK:accept
        c.close()
        accepted[0] += 1

KEPT = [socket.create_connection(ADDR) for _ in range(7)]  # MARK:kept
made = [0]
ticks = [0]
running = [True]

def churn():
    for _ in range(300):
        s = socket.create_connection(ADDR)  # MARK:churn
        s.close()
        made[0] += 1

def ticker():
    while running[0]:
        gevent.sleep(0.01)
        ticks[0] += 1

acc = gevent.spawn(acceptor)
tick = gevent.spawn(ticker)
t0 = time.monotonic()
gevent.joinall([gevent.spawn(churn) for _ in range(8)], timeout=60)
elapsed = time.monotonic() - t0
running[0] = False
tick.join(5)
while accepted[0] < made[0] + 7:
    gevent.sleep(0.01)
a, b = socket.socketpair()  # MARK:pair
a.close(); b.close()
print(json.dumps({"made": made[0], "accepted": accepted[0], "ticks": ticks[0], "elapsed": elapsed,
                  "type": socket.socket.__module__}), flush=True)
'''


def _run(tmp_path: Path, mode: str, enabled: bool) -> tuple:
    path, marks = write_app(tmp_path, GEVENT_APP)
    folder = tmp_path / f"snap-{mode}-{enabled}"
    env = {"CONNWATCH_DIR": str(folder), "CONNWATCH_SNAPSHOT_INTERVAL": "0.02"}
    if enabled and mode == "pth":
        env["CONNWATCH_ENABLED"] = "1"
    proc = run([str(path), mode if enabled else "off"], timeout=120, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return path, marks, folder, last_json(proc.stdout)


@pytest.mark.parametrize("mode", ["pth", "enable"], ids=["agent-before-patch", "enable-after-patch"])
def test_gevent_sockets_are_counted_and_the_loop_keeps_ticking(tmp_path: Path, mode: str) -> None:
    path, marks, folder, out = _run(tmp_path, mode, True)
    assert out["type"].startswith("gevent"), out
    made = out["made"]
    assert made == 8 * 300
    (data,) = snapshot_files(folder).values()
    assert totals(data, path, marks["kept"], "socket") == (7, 7, 0)
    assert totals(data, path, marks["churn"], "socket") == (0, made, made)
    assert totals(data, path, marks["accept"], "socket") == (0, made + 7, made + 7)
    assert totals(data, path, marks["pair"], "socket") == (0, 2, 2)
    roles = {r["role"] for r in data["callsites"] if r["line"] == marks["churn"]}
    assert roles == {"client"}
    roles = {r["role"] for r in data["callsites"] if r["line"] == marks["accept"]}
    assert roles == {"accepted"}
    # The loop was not starved: the 10 ms ticker ran about as often per second as without the
    # agent (a broad factor: this is about blocking calls on the hub, not speed).
    _, _, _, plain = _run(tmp_path, mode, False)
    rate_on = out["ticks"] / out["elapsed"]
    rate_off = plain["ticks"] / plain["elapsed"]
    assert rate_on > rate_off / 4, (out, plain)
