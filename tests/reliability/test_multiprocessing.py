"""multiprocessing with fork, spawn and forkserver: every process writes its own snapshot file
with its own counts, including children that end with os._exit (their final snapshot comes
from connwatch._mp); no lock inherited held; no duplicated exporter thread."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import last_json, run, snapshot_files, totals, write_app

MP_APP = '''\
import json, multiprocessing as mp, os, socket, sys, threading, time
from concurrent.futures import ProcessPoolExecutor

srv = socket.create_server(("127.0.0.1", 0), backlog=512)
ADDR = srv.getsockname()
KEPT = []

def child(n, addr):
    for _ in range(n):
        KEPT.append(socket.create_connection(addr))  # MARK:child
    socket.create_connection(addr).close()  # MARK:closed
    names = [t.name for t in threading.enumerate()]
    assert names.count("connwatch-snapshot") == 1, names

def task(addr):
    KEPT.append(socket.create_connection(addr))  # MARK:task
    time.sleep(0.02)
    return os.getpid()

if __name__ == "__main__":
    method = sys.argv[1]
    ctx = mp.get_context(method)
    mine = [socket.create_connection(ADDR) for _ in range(2)]  # MARK:parent
    procs = [ctx.Process(target=child, args=(n, ADDR)) for n in (3, 5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    served = {}
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
        for pid in ex.map(task, [ADDR] * 12):
            served[pid] = served.get(pid, 0) + 1
    print(json.dumps({"parent": os.getpid(), "children": {p.pid: p.exitcode for p in procs},
                      "sizes": {p.pid: n for p, n in zip(procs, (3, 5))}, "served": served}), flush=True)
'''


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_each_process_writes_its_own_counts(tmp_path: Path, method: str) -> None:
    path, marks = write_app(tmp_path, MP_APP)
    folder = tmp_path / "snap"
    # No periodic writes: every child's file comes from its final write at exit.
    proc = run([str(path), method], timeout=120, CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder),
               CONNWATCH_SNAPSHOT_INTERVAL="3600")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "connwatch" not in proc.stderr, proc.stderr
    out = last_json(proc.stdout)
    assert set(out["children"].values()) == {0}, out
    files = snapshot_files(folder)
    parent = files[out["parent"]]
    assert totals(parent, path, marks["parent"]) == (2, 2, 0)
    for mark in ("child", "closed", "task"):
        assert totals(parent, path, marks[mark]) == (0, 0, 0), f"the parent's file holds children's {mark}"
    for pid, n in out["sizes"].items():
        data = files[int(pid)]
        assert totals(data, path, marks["child"]) == (n, n, 0)
        assert totals(data, path, marks["closed"]) == (0, 1, 1)
        assert totals(data, path, marks["task"]) == (0, 0, 0)
        # a forked child holds the parent's two sockets (its history starts there); others don't
        assert totals(data, path, marks["parent"]) == ((2, 2, 0) if method == "fork" else (0, 0, 0))
    assert out["served"], out
    for pid, n in out["served"].items():
        data = files[int(pid)]
        assert totals(data, path, marks["task"]) == (n, n, 0), (pid, n)
        assert totals(data, path, marks["child"]) == (0, 0, 0)
    # Nobody else wrote a file claiming any of these clients (at most the forkserver's own).
    known = {out["parent"], *map(int, out["sizes"]), *map(int, out["served"])}
    for pid, data in files.items():
        if pid not in known:
            assert all(totals(data, path, marks[m]) == (0, 0, 0) for m in ("child", "closed", "task")), pid


FORK_AT_START_APP = '''\
import os, socket
keep = socket.socket()
for _ in range(200):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print("ok")
'''


def test_forking_while_the_exporter_thread_imports_is_quiet(tmp_path: Path) -> None:
    # The exporter thread imports the SDK and grpc in the background at start-up; a pre-fork
    # server forks at once. A fork hook registered by that thread mid-fork used to make
    # os.fork() print "Exception ignored ... release unlocked lock" in the app.
    path, _ = write_app(tmp_path, FORK_AT_START_APP)
    for _ in range(3):
        proc = run([str(path)], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "snap"),
                   CONNWATCH_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT="http://127.0.0.1:9",
                   OTEL_METRIC_EXPORT_INTERVAL="60000")
        assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
        assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
