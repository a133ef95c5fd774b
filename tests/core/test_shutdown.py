"""Interpreter exit and descriptor exhaustion: no tracebacks from the agent, the app's own
errors unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_py

SHUTDOWN_APP = '''\
import atexit, socket, threading, time

srv = socket.create_server(("127.0.0.1", 0))
addr = srv.getsockname()

class Holder:
    def __init__(self):
        self.sock = socket.create_connection(addr)
        self.me = self            # a cycle: finalized late, during interpreter shutdown
    def __del__(self):
        self.sock.close()

HOLDERS = [Holder() for _ in range(20)]
AT_EXIT = [socket.create_connection(addr) for _ in range(20)]
atexit.register(lambda: [s.close() for s in AT_EXIT])

def churn():
    while True:
        s = socket.socket()
        s.close()

for _ in range(4):
    threading.Thread(target=churn, daemon=True).start()
time.sleep(0.2)
print("exiting")
'''

EXHAUST_APP = '''\
import errno, resource, socket
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
srv = socket.create_server(("127.0.0.1", 0), backlog=128)
keep = []
try:
    while True:
        keep.append(socket.create_connection(srv.getsockname()))
except OSError as e:
    print(type(e).__name__, errno.errorcode[e.errno])
'''


def test_closing_at_exit_from_atexit_del_and_daemon_threads_is_quiet(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(SHUTDOWN_APP)
    for _ in range(3):
        proc = run_py([str(tmp_path / "app.py")], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "s"),
                      CONNWATCH_SNAPSHOT_INTERVAL="0.05")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "exiting\n"
        assert proc.stderr == "", proc.stderr


def test_descriptor_exhaustion_gives_the_app_its_own_error(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(EXHAUST_APP)
    plain = run_py([str(tmp_path / "app.py")])
    assert plain.returncode == 0 and plain.stdout == "OSError EMFILE\n"
    folder = tmp_path / "s"
    proc = run_py([str(tmp_path / "app.py")], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder),
                  CONNWATCH_SNAPSHOT_INTERVAL="0.05")
    assert proc.returncode == 0
    assert proc.stdout == plain.stdout, "the app sees the error it would have had anyway"
    # the agent's own writes fail quietly: at most one rate-limited line, no traceback
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("connwatch:") <= 1, proc.stderr
    # the last snapshot that could be written is valid JSON, never a torn file
    for path in folder.glob("*.json"):
        json.loads(path.read_text())
