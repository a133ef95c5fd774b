"""asyncio and uvloop: counts right at the coroutine lines, no file I/O of the agent on the
event loop's thread, the loop not starved; uvloop's own connections (libuv's) counted as
asyncio's are."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import last_json, run, snapshot_files, totals, write_app

ASYNC_APP = '''\
import asyncio, json, os, socket, sys, threading, time

SNAP_DIR = os.environ.get("CONNWATCH_DIR", "/nonexistent")
loop_io = []  # file opens of the snapshot folder made on the loop's thread
LOOP_THREAD = threading.get_ident()

def audit(event, args):
    if event in ("open", "os.rename", "os.replace") and threading.get_ident() == LOOP_THREAD:
        if args and str(args[0]).startswith(SNAP_DIR):
            loop_io.append((event, str(args[0])))

sys.addaudithook(audit)
ticks = [0]

async def ticker(stop):
    while not stop.is_set():
        await asyncio.sleep(0.01)
        ticks[0] += 1

async def handler(reader, writer):
    writer.close()

async def main():
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=1024)
    port = srv.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop))
    made = {"loop": 0, "sock": 0}
    t0 = time.monotonic()

    async def churn():
        for _ in range(150):
            r, w = await asyncio.open_connection("127.0.0.1", port)  # MARK:loop
            w.close()
            await w.wait_closed()
            made["loop"] += 1
            s = socket.socket()  # MARK:sock
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
            r, w = await asyncio.open_connection(sock=s)
            w.close()
            await w.wait_closed()
            made["sock"] += 1

    await asyncio.gather(*(churn() for _ in range(8)))
    elapsed = time.monotonic() - t0
    stop.set()
    await tick
    kept = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]  # MARK:kept
    srv.close()
    await srv.wait_closed()
    print(json.dumps({"made": made, "ticks": ticks[0], "elapsed": elapsed, "loop_io": loop_io,
                      "loop": type(asyncio.get_running_loop()).__module__}), flush=True)
    for r, w in kept:
        w.close()

if sys.argv[1] == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()  # (asyncio.Runner's loop_factory is 3.11+)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
else:
    asyncio.run(main())
'''


def _run(tmp_path: Path, loop: str, enabled: bool) -> tuple:
    path, marks = write_app(tmp_path, ASYNC_APP)
    folder = tmp_path / f"snap-{loop}-{enabled}"
    env = {"CONNWATCH_DIR": str(folder), "CONNWATCH_SNAPSHOT_INTERVAL": "0.01"}
    if enabled:
        env["CONNWATCH_ENABLED"] = "1"
    proc = run([str(path), loop], timeout=120, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return path, marks, folder, last_json(proc.stdout)


def test_asyncio_counts_and_the_loop_does_no_agent_file_io(tmp_path: Path) -> None:
    path, marks, folder, out = _run(tmp_path, "asyncio", True)
    assert out["loop"].startswith("asyncio")
    made = out["made"]
    assert made == {"loop": 1200, "sock": 1200}
    # the agent wrote its file ~every 10 ms meanwhile, and never on the loop's thread
    assert out["loop_io"] == []
    (data,) = snapshot_files(folder).values()
    assert totals(data, path, marks["loop"], "socket") == (0, 1200, 1200)
    assert totals(data, path, marks["sock"], "socket") == (0, 1200, 1200)
    # the final snapshot is written after main() returned: the kept ones were closed by then
    assert totals(data, path, marks["kept"], "socket") == (0, 4, 4)
    _, _, _, plain = _run(tmp_path, "asyncio", False)
    # The loop was not starved (a broad factor: this is about blocking calls, not speed).
    assert out["ticks"] / out["elapsed"] > plain["ticks"] / plain["elapsed"] / 4, (out, plain)


def test_uvloop_counts_its_own_connections_and_python_sockets(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    path, marks, folder, out = _run(tmp_path, "uvloop", True)
    assert out["loop"].startswith("uvloop")
    assert out["made"] == {"loop": 1200, "sock": 1200}
    assert out["loop_io"] == []
    (data,) = snapshot_files(folder).values()
    # Sockets the app makes and hands to the loop (sock=) are counted and released once.
    assert totals(data, path, marks["sock"], "socket") == (0, 1200, 1200)
    # Connections uvloop opens itself (libuv, in C) are counted as asyncio's are.
    assert totals(data, path, marks["loop"], "socket") == (0, 1200, 1200)
    assert totals(data, path, marks["kept"], "socket") == (0, 4, 4)
    _, _, _, plain = _run(tmp_path, "uvloop", False)
    assert out["ticks"] / out["elapsed"] > plain["ticks"] / plain["elapsed"] / 4, (out, plain)
