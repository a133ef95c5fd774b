"""Fork: the child writes its own file with its own counts; no lock is inherited held."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import run_py

FORK_APP = '''\
import os, socket, sys, time
srv = socket.create_server(("127.0.0.1", 0))
port = srv.getsockname()[1]
KEEP = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # line 4: parent's
pid = os.fork()
if pid == 0:
    MINE = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # line 7: child's
    KEEP[0].close()
    import connwatch  # the child's writer thread writes its own file meanwhile
    end = time.monotonic() + 10
    while not os.path.exists(connwatch.snapshot_path()) and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.6)  # and again after the close above (every 0.2 s)
    os._exit(0)
os.waitpid(pid, 0)
print(pid)
'''

HAMMER_APP = '''\
import os, socket, sys, threading, time
stop = False
def churn():
    while not stop:
        s = socket.socket()
        s.close()
threads = [threading.Thread(target=churn, daemon=True) for _ in range(8)]
for t in threads:
    t.start()
hung = 0
for _ in range(30):
    pid = os.fork()
    if pid == 0:
        for _ in range(100):
            socket.socket().close()  # line 15
        import connwatch
        mine = [st for st in connwatch.snapshot().statistics() if st.site.line == 15]
        # (sockets the churn threads held at the fork stay live: the child holds them)
        os._exit(0 if [(st.live, st.created) for st in mine] == [(0, 100)] else 3)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.waitstatus_to_exitcode(status) != 0:
                print("child failed", os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            hung += 1
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
stop = True
print("hung", hung)
'''


def rows(data: dict, line: int) -> list:
    return [r for r in data["callsites"] if r["file"].endswith("app.py") and r["line"] == line]


def test_child_writes_its_own_file_with_its_own_counts(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(FORK_APP)
    out = tmp_path / "snap"
    proc = run_py([str(tmp_path / "app.py")], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(out),
                  CONNWATCH_SNAPSHOT_INTERVAL="0.2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    child_pid = int(proc.stdout)
    files = {json.loads(p.read_text())["pid"]: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert len(files) == 2 and child_pid in files
    child = files[child_pid]
    (parent,) = [d for pid, d in files.items() if pid != child_pid]
    # the parent: its 3 clients, nothing of the child's
    (p4,) = rows(parent, 4)
    assert (p4["live"], p4["created"]) == (3, 3)
    assert rows(parent, 7) == []
    # the child: the inherited clients it still holds, its own two, its own history
    (c4,) = rows(child, 4)
    assert (c4["live"], c4["created"], c4["closed"]) == (2, 3, 1)
    (c7,) = rows(child, 7)
    assert (c7["live"], c7["created"]) == (2, 2)
    assert child["started"] >= parent["started"]


def test_fork_while_threads_use_the_registry_never_deadlocks(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(HAMMER_APP)
    proc = run_py([str(tmp_path / "app.py")], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "s"),
                  CONNWATCH_SNAPSHOT_INTERVAL="0.05", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == ["hung 0"], proc.stdout
    assert "Traceback" not in proc.stderr


WARN_APP = '''\
import os, socket, sys, threading, time, warnings
srv = socket.create_server(("127.0.0.1", 0))
KEEP = socket.create_connection(srv.getsockname())
if sys.argv[1] == "app-thread":
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
before = len(warnings.filters)
print(threading.active_count())
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if len(warnings.filters) == before else 3)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), len(warnings.filters) - before)
'''


def test_a_fork_warns_of_threads_only_when_the_app_has_some(tmp_path: Path) -> None:
    # CPython 3.12+ warns at a fork in a multi-threaded process: the agent's writer thread alone
    # must not make an app that forks from its only thread see that warning (nor leave a filter
    # behind, in the parent or the child); a thread of the app's own still does.
    (tmp_path / "app.py").write_text(WARN_APP)
    for mode, threads in (("no-thread", 2), ("app-thread", 3)):
        proc = run_py([str(tmp_path / "app.py"), mode], CONNWATCH_ENABLED="1",
                      CONNWATCH_DIR=str(tmp_path / "s"), CONNWATCH_SNAPSHOT_INTERVAL="0.2")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == str(threads), proc.stdout  # the agent's writer thread is running
        assert lines[1:] == ["0 0"] * 3, proc.stdout  # no filter left behind, parent or child
        if mode == "no-thread":
            assert proc.stderr == ""
        else:
            assert ("is multi-threaded" in proc.stderr) == (sys.version_info >= (3, 12)), proc.stderr
