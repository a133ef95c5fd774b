"""Socket coverage on real loopback sockets: every path returns to zero live after close."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import Server, live_at

F = __file__


def here() -> int:
    return sys._getframe(1).f_lineno


def stat_for(snap: Any, line: int, role: Any = "*") -> Any:
    found = [s for s in snap.statistics() if s.site and s.site.file == F and s.site.line == line
             and (role == "*" or s.role == role)]
    assert len(found) == 1, found
    return found[0]


def test_plain_socket_and_close(agent: Any) -> None:
    line = here() + 1
    socks = [socket.socket() for _ in range(3)]
    st = stat_for(agent.snapshot(), line)
    assert (st.kind, st.role, st.live, st.created) == ("socket", None, 3, 3)
    for s in socks:
        s.close()
    st = stat_for(agent.snapshot(), line)
    assert (st.live, st.closed, st.gc_released) == (0, 3, 0)


def test_create_connection_is_a_client_with_its_upstream(agent: Any, tcp_server: Server) -> None:
    line = here() + 1
    conns = [socket.create_connection(tcp_server.address, timeout=5) for _ in range(4)]
    st = stat_for(agent.snapshot(), line)
    assert (st.label(), st.live) == ("socket/client", 4)
    assert st.upstreams == ((tcp_server.upstream, 4),)
    for c in conns:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        c.close()
    assert live_at(agent.snapshot(), F, line) == 0


def test_ipv6_upstream_format(agent: Any) -> None:
    server = Server("tcp", "::1")
    try:
        line = here() + 1
        c = socket.create_connection(("::1", server.port), timeout=5)
        st = stat_for(agent.snapshot(), line)
        assert st.upstreams == ((f"[::1]:{server.port}", 1),)
        c.close()
        assert live_at(agent.snapshot(), F, line) == 0
    finally:
        server.stop()


def test_connect_ex_and_nonblocking_connect(agent: Any, tcp_server: Server) -> None:
    line_a = here() + 1
    a = socket.socket()
    assert a.connect_ex(tcp_server.address) == 0
    line_b = here() + 1
    b = socket.socket()
    b.setblocking(False)
    try:
        b.connect(tcp_server.address)
    except BlockingIOError:
        pass
    snap = agent.snapshot()
    assert stat_for(snap, line_a).label() == "socket/client"
    assert stat_for(snap, line_b).label() == "socket/client"
    a.close()
    b.close()
    snap = agent.snapshot()
    assert live_at(snap, F, line_a) == live_at(snap, F, line_b) == 0


def test_refused_connect_stays_unconnected(agent: Any) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on port now
    line = here() + 1
    s = socket.socket()
    with pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    assert stat_for(agent.snapshot(), line).role is None
    s.close()


def test_listener_and_accepted(agent: Any) -> None:
    line_l = here() + 1
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname(), timeout=5)
    line_a = here() + 1
    conn, _ = srv.accept()
    snap = agent.snapshot()
    assert stat_for(snap, line_l, "listener").live == 1
    assert stat_for(snap, line_a, "accepted").live == 1
    for s in (conn, c, srv):
        s.close()
    snap = agent.snapshot()
    assert live_at(snap, F, line_l) == live_at(snap, F, line_a) == 0
    assert snap.live == 0


def test_socketpair(agent: Any) -> None:
    line = here() + 1
    a, b = socket.socketpair()
    st = stat_for(agent.snapshot(), line)
    assert (st.label(), st.live) == ("socket/pair", 2)
    a.close()
    b.close()
    assert live_at(agent.snapshot(), F, line) == 0


def test_fromfd_and_dup_keep_the_role(agent: Any, tcp_server: Server) -> None:
    c = socket.create_connection(tcp_server.address, timeout=5)
    line_f = here() + 1
    f = socket.fromfd(c.fileno(), c.family, c.type)
    line_d = here() + 1
    d = c.dup()
    snap = agent.snapshot()
    for line in (line_f, line_d):
        st = stat_for(snap, line)
        assert st.label() == "socket/client" and st.upstreams == ((tcp_server.upstream, 1),)
    for s in (f, d, c):
        s.close()
    assert agent.snapshot().live == 0


def test_makefile_keeps_the_socket_live_until_the_file_closes(agent: Any, tcp_server: Server) -> None:
    line = here() + 1
    c = socket.create_connection(tcp_server.address, timeout=5)
    f = c.makefile("rwb")
    c.close()
    assert live_at(agent.snapshot(), F, line) == 1, "the descriptor is still open"
    f.close()
    assert live_at(agent.snapshot(), F, line) == 0


def test_detach_releases(agent: Any) -> None:
    import os

    line = here() + 1
    s = socket.socket()
    fd = s.detach()
    st = stat_for(agent.snapshot(), line)
    assert (st.live, st.closed) == (0, 1)
    os.close(fd)


def test_garbage_collected_socket_is_counted_as_gc_released(agent: Any, tcp_server: Server) -> None:
    line = here() + 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        socket.create_connection(tcp_server.address, timeout=5)  # dropped without close
        gc.collect()
    st = stat_for(agent.snapshot(), line)
    assert (st.live, st.closed, st.gc_released) == (0, 1, 1)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    trustme = pytest.importorskip("trustme", reason="trustme is a test dependency (pip install .[test])")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d: Path = tmp_path_factory.mktemp("tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    server = Server("tls", "127.0.0.1", str(d / "server.pem"), str(d / "server.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    yield server, ctx
    server.stop()


def test_ssl_wrap_counts_one_client_at_the_original_site(agent: Any, tls_server: Any) -> None:
    server, ctx = tls_server
    line = here() + 1
    raw = socket.create_connection(server.address, timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"hello")
    assert tls.recv(5) == b"hello"
    snap = agent.snapshot()
    st = stat_for(snap, line)
    assert (st.label(), st.live, st.created) == ("socket/client", 1, 1)
    assert st.upstreams == ((server.upstream, 1),)
    assert snap.live == 1, "the raw socket and the SSLSocket are one client"
    tls.close()
    snap = agent.snapshot()
    assert snap.live == 0 and stat_for(snap, line).closed == 1


def test_ssl_socket_connected_after_wrapping(agent: Any, tls_server: Any) -> None:
    server, ctx = tls_server
    line = here() + 1
    tls = ctx.wrap_socket(socket.socket(), server_hostname="localhost")
    tls.settimeout(5)
    tls.connect(server.address)
    assert stat_for(agent.snapshot(), line).label() == "socket/client"
    tls.close()
    assert agent.snapshot().live == 0


def test_asyncio_transports(agent: Any, tcp_server: Server) -> None:
    lines = {}

    async def main() -> None:
        lines["open"] = here() + 1
        reader, writer = await asyncio.open_connection(*tcp_server.address)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        st = stat_for(agent.snapshot(), lines["open"])
        assert (st.label(), st.live) == ("socket/client", 1)
        writer.close()
        await writer.wait_closed()
        assert live_at(agent.snapshot(), F, lines["open"]) == 0

    asyncio.run(main())
    assert agent.snapshot().live == 0, "the loop's own self-pipe is closed with the loop"


def test_agent_errors_never_reach_the_app(agent: Any,
                                          caplog: pytest.LogCaptureFixture, tcp_server: Server) -> None:
    from connwatch import _registry

    socks = [socket.socket() for _ in range(5)]  # tracked while the registry works
    agent.snapshot()
    # Corrupt the registry's own state (the C and the Python registry share these containers):
    # every event applied from now on fails inside the registry.
    saved = _registry._totals[0]
    _registry._totals[0] = "not a number"  # type: ignore[call-overload]
    try:
        with caplog.at_level(logging.WARNING, logger="connwatch"):
            socks += [socket.socket() for _ in range(5)]
            for s in socks:
                s.connect(tcp_server.address)
                s.sendall(b"ok")
                assert s.recv(2) == b"ok"
                s.close()
            agent.snapshot()  # applies the queued events: the registry fails, the caller does not
    finally:
        _registry._totals[0] = saved
    records = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert len(records) == 1, records  # once, not per socket
    assert all("the app is unaffected" in r for r in records)


def test_disable_restores_the_exact_originals() -> None:
    import connwatch

    before = {k: socket.socket.__dict__.get(k) for k in ("__init__", "_real_close", "detach", "accept", "listen")}
    had_connect = "connect" in socket.socket.__dict__
    pair = socket.socketpair
    assert connwatch.enable(snapshot_interval=0)
    assert socket.socket.__init__ is not before["__init__"]
    assert connwatch.enable(), "enabling twice is a no-op"
    connwatch.disable()
    assert {k: socket.socket.__dict__.get(k) for k in before} == before
    assert ("connect" in socket.socket.__dict__) == had_connect
    assert socket.socketpair is pair


def test_disable_leaves_a_later_patch_of_someone_else_alone() -> None:
    import connwatch

    original = socket.socketpair
    assert connwatch.enable(snapshot_interval=0)
    ours = socket.socketpair

    def theirs(*args: Any, **kwargs: Any) -> Any:  # e.g. gevent's patch_all() after we started
        return ours(*args, **kwargs)

    socket.socketpair = theirs
    try:
        connwatch.disable()
        assert socket.socketpair is theirs, "disable() must not undo a patch made after ours"
        assert not getattr(socket.socket.__dict__["__init__"], "__connwatch_patch__", False)
    finally:
        socket.socketpair = original
