"""Caps on real loopback sockets: process, call site and upstream limits; warn and raise."""

from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List

import pytest

import connwatch
from connwatch import ClientCapExceeded, _log
from tests.conftest import Server, run_py


def here() -> int:
    return sys._getframe(1).f_lineno


@pytest.fixture
def cap(tmp_path: Path) -> Iterator[Any]:
    started: List[bool] = []

    def start(**kw: Any) -> Any:
        _log.reset()
        assert connwatch.enable(dir=str(tmp_path / "s"), snapshot_interval=0, **kw)
        started.append(True)
        return connwatch

    yield start
    connwatch.disable()
    _log.reset()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    # created before the agent starts: not counted, and lets the test see every connection
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def accepted(srv: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            return n
        conn.close()
        n += 1


def connect(addr: Any) -> socket.socket:
    return socket.create_connection(addr, timeout=5)


def test_raise_mode_refuses_before_connecting(cap: Any, listener: socket.socket) -> None:
    cap(cap=3, cap_mode="raise")
    addr = listener.getsockname()
    line = connect.__code__.co_firstlineno + 1
    held = [connect(addr) for _ in range(3)]
    with pytest.raises(ClientCapExceeded) as info:
        connect(addr)
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.EMFILE
    msg = str(err)
    assert f"{__file__}:{line} (connect) refused" in msg and "CONNWATCH_CAP=3" in msg
    assert "top live call sites: 3 socket at" in msg
    assert accepted(listener) == 3, "the refused client never reached the server"
    snap = connwatch.snapshot()
    assert snap.cap["exceeded"] == 1 and snap.cap["limit"] == 3 and snap.cap["mode"] == "raise"
    held.pop().close()
    held.append(connect(addr))  # room again after a release
    assert accepted(listener) == 1
    for s in held:
        s.close()


def test_per_callsite_cap(cap: Any, listener: socket.socket) -> None:
    cap(cap_per_callsite=2, cap_mode="raise")
    addr = listener.getsockname()
    a = [connect(addr) for _ in range(2)]
    with pytest.raises(ClientCapExceeded, match="CONNWATCH_CAP_PER_CALLSITE=2"):
        a.append(connect(addr))
    b = [socket.create_connection(addr, timeout=5) for _ in range(2)]  # another call site
    for s in a + b:
        s.close()


def test_per_upstream_cap(cap: Any, listener: socket.socket, tcp_server: Server) -> None:
    cap(cap_per_upstream=2, cap_mode="raise")
    addr = listener.getsockname()
    a = [connect(addr) for _ in range(2)]
    with pytest.raises(ClientCapExceeded, match=r"live clients to 127\.0\.0\.1:\d+ would exceed"):
        connect(addr)
    b = [connect(tcp_server.address) for _ in range(2)]
    for s in a + b:
        s.close()


def test_servers_and_pairs_do_not_count(cap: Any) -> None:
    cap(cap=1, cap_mode="raise")
    srv = socket.create_server(("127.0.0.1", 0))
    pair = socket.socketpair()
    c = connect(srv.getsockname())
    conn, _ = srv.accept()
    with pytest.raises(ClientCapExceeded):
        connect(srv.getsockname())
    for s in (conn, c, srv, *pair):
        s.close()


def test_warn_mode_allows_logs_once_per_site_per_minute_and_counts(
        cap: Any, listener: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    cap(cap=2)
    addr = listener.getsockname()
    with caplog.at_level(logging.WARNING, logger="connwatch"):
        held = [connect(addr) for _ in range(6)]
    line = connect.__code__.co_firstlineno + 1
    assert accepted(listener) == 6, "warn mode lets every client through"
    records = [r.getMessage() for r in caplog.records]
    assert len(records) == 1, records
    assert "allowed (warn mode)" in records[0] and "CONNWATCH_CAP=2" in records[0]
    assert f"{__file__}:{line} in " in records[0], "the call site's traceback is in the record"
    assert connwatch.snapshot().cap["exceeded"] == 4
    for s in held:
        s.close()


def test_sixteen_threads_racing_at_the_limit(cap: Any, listener: socket.socket) -> None:
    cap(cap=5, cap_mode="raise")
    addr = listener.getsockname()
    for _round in range(5):
        ok: List[socket.socket] = []
        refused: List[BaseException] = []
        barrier = threading.Barrier(16)

        def worker(barrier: threading.Barrier = barrier, ok: List[socket.socket] = ok,
                   refused: List[BaseException] = refused) -> None:
            barrier.wait()
            try:
                ok.append(connect(addr))
            except ClientCapExceeded as e:
                refused.append(e)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert (len(ok), len(refused)) == (5, 11)
        assert accepted(listener) == 5
        for s in ok:
            s.close()


def test_invalid_mode_falls_back_to_warn(cap: Any, listener: socket.socket,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="connwatch"):
        cap(cap=1, cap_mode="rasie")
        held = [connect(listener.getsockname()) for _ in range(2)]
    assert "CONNWATCH_CAP_MODE" in caplog.records[0].getMessage()
    for s in held:
        s.close()


def test_connwatch_run_flags_reach_the_app(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import socket\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "keep = []\n"
        "try:\n"
        "    for _ in range(5):\n"
        "        keep.append(socket.create_connection(srv.getsockname()))\n"
        "except OSError as e:\n"
        "    print(type(e).__name__, e.errno, len(keep))\n"
    )
    proc = run_py(["-m", "connwatch", "run", "--dir", str(tmp_path / "s"), "--cap", "2", "--cap-mode",
                   "raise", "--", sys.executable, str(app)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ClientCapExceeded {errno.EMFILE} 2"
