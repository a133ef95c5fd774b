"""uvloop: the connections, listeners and accepted connections libuv opens are counted as
asyncio's are (kind ``socket``, roles client/listener/accepted) at the coroutine line, released
on close or collection, under caps; a real uvloop server and client on 127.0.0.1 (and a Unix
socket)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest

uvloop = pytest.importorskip("uvloop")

import connwatch  # noqa: E402
from connwatch import ClientCapExceeded  # noqa: E402
from connwatch.patches import stdlib_socket, uvloop_loop  # noqa: E402
from tests.conftest import drop_agent_env, live_at, run_py  # noqa: E402

HERE = __file__
TARGETS = [name for name, _make in uvloop_loop._TARGETS]


def _line(marker: str) -> int:
    for i, text in enumerate(Path(HERE).read_text().splitlines(), 1):
        if text.rstrip().endswith(f"# {marker}"):
            return i
    raise AssertionError(marker)


def _open(snap: Any, line: Any = None) -> int:
    """Live sockets of this file (at ``line``) but the loops' own wake-up socket pairs."""
    return live_at(snap, HERE, line, "socket") - live_at(snap, HERE, line, "socket", "pair")


def _rows(snap: Any, kind: str = "socket") -> List[Tuple[Any, ...]]:
    """(role, line, live, created, closed, gc_released) of this file's rows of ``kind``."""
    out = []
    for s in snap.statistics("callsite"):
        if s.kind == kind and s.site is not None and os.path.basename(s.site.file) == os.path.basename(HERE):
            out.append((s.role, s.site.line, s.live, s.created, s.created - s.live, s.gc_released))
    return sorted(out, key=repr)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(1024)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def test_the_patch_is_installed_on_uvloop_loop(agent: Any) -> None:
    assert uvloop_loop.is_patched()
    for name in TARGETS:
        assert uvloop.Loop.__dict__[name].__connwatch_patch__ is True
    assert isinstance(uvloop.new_event_loop(), uvloop.Loop)


def test_a_leak_of_25_open_connection_is_attributed_to_its_line(agent: Any) -> None:
    async def main() -> Tuple[int, List[Any], Any]:
        srv = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        kept = []
        for _ in range(25):
            kept.append(await asyncio.open_connection("127.0.0.1", port))  # LEAK
        snap = agent.snapshot()
        for _r, w in kept:
            w.close()
            await w.wait_closed()
        after = agent.snapshot()
        srv.close()
        await srv.wait_closed()
        return port, [snap, after], srv

    port, (snap, after), _srv = uvloop.run(main())
    line = _line("LEAK")
    assert live_at(snap, HERE, line, "socket", "client") == 25
    (stat,) = [s for s in snap.statistics("callsite") if s.site is not None and s.site.line == line]
    assert dict(stat.upstreams) == {f"127.0.0.1:{port}": 25}
    # closing releases: closed, not collected
    assert live_at(after, HERE, line, "socket") == 0
    (stat,) = [s for s in after.statistics("callsite") if s.site is not None and s.site.line == line]
    assert (stat.created, stat.gc_released) == (25, 0)


def test_listener_and_accepted_connections_are_counted_with_their_roles(agent: Any) -> None:
    async def main() -> Dict[str, Any]:
        accepted = asyncio.Event()
        n = [0]

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n[0] += 1
            if n[0] == 3:
                accepted.set()
            await reader.read()
            writer.close()

        srv = await asyncio.start_server(handler, "127.0.0.1", 0)  # LISTEN
        port = srv.sockets[0].getsockname()[1]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]  # CONNECT
        await asyncio.wait_for(accepted.wait(), 10)
        during = agent.snapshot()
        for _r, w in conns:
            w.close()
            await w.wait_closed()
        srv.close()
        await srv.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0.01)  # libuv frees the closed handles on the next iterations
        return {"during": during, "after": agent.snapshot()}

    out = uvloop.run(main())  # RUN
    during, after = out["during"], out["after"]
    assert live_at(during, HERE, _line("LISTEN"), "socket", "listener") == 1
    assert live_at(during, HERE, _line("CONNECT"), "socket", "client") == 3
    # accepted as asyncio attributes them: the first user frame when the loop accepts
    assert live_at(during, HERE, _line("RUN"), "socket", "accepted") == 3
    assert _open(after) == 0
    assert all(s.gc_released == 0 for s in after.statistics("callsite")), after.statistics("callsite")


def test_a_transport_dropped_unclosed_is_released_when_collected(agent: Any) -> None:
    async def main() -> Tuple[Any, Any]:
        srv = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        kept = []
        for _ in range(5):
            # a bare protocol: a StreamWriter would close its transport when collected
            kept.append(await loop.create_connection(asyncio.Protocol, "127.0.0.1", port))  # DROPPED
            kept[-1][0].pause_reading()  # libuv no longer holds it: only the app does
        before = agent.snapshot()
        kept.clear()
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.01)
        after = agent.snapshot()
        srv.close()
        return before, after

    with pytest.warns(ResourceWarning):  # uvloop's own word for a transport collected open
        before, after = uvloop.run(main())
        gc.collect()
    line = _line("DROPPED")
    assert live_at(before, HERE, line, "socket", "client") == 5
    assert live_at(after, HERE, line, "socket") == 0
    (stat,) = [s for s in after.statistics("callsite") if s.site is not None and s.site.line == line]
    assert stat.gc_released == 5


def test_cap_in_raise_mode_refuses_before_connecting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drop_agent_env(monkeypatch)
    assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0, cap_per_callsite=3, cap_mode="raise")
    try:
        async def main() -> Tuple[int, List[Any], Any]:
            seen = [0]

            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                seen[0] += 1
                await reader.read()
                writer.close()

            srv = await asyncio.start_server(handler, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            conns, errors = [], []
            for _ in range(5):
                try:
                    conns.append(await asyncio.open_connection("127.0.0.1", port))  # CAPPED
                except ClientCapExceeded as e:
                    errors.append(e)
            for _ in range(20):
                await asyncio.sleep(0.01)
            opened = seen[0]
            snap = connwatch.snapshot()
            for _r, w in conns:
                w.close()
                await w.wait_closed()
            # a slot freed by a close is usable again
            _r, w = await asyncio.open_connection("127.0.0.1", port)  # CAPPED
            w.close()
            await w.wait_closed()
            srv.close()
            return opened, errors, snap

        opened, errors, snap = uvloop.run(main())
    finally:
        connwatch.disable()
    assert len(errors) == 2
    assert all(e.limit_name == "callsite" and e.site is not None and e.site.line == _line("CAPPED") for e in errors)
    assert opened == 3  # the refused ones never reached the server
    assert live_at(snap, HERE, _line("CAPPED"), "socket", "client") == 3


def test_per_upstream_cap_with_a_host_name_refuses_once_resolved(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    drop_agent_env(monkeypatch)
    assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0, cap_per_upstream=2, cap_mode="raise")
    try:
        async def main() -> Tuple[int, List[Any], Any]:
            srv = await asyncio.start_server(_echo, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            conns, errors = [], []
            for host in ("127.0.0.1", "localhost", "localhost"):
                try:
                    conns.append(await asyncio.open_connection(host, port, family=socket.AF_INET))  # BYNAME
                except ClientCapExceeded as e:
                    errors.append(e)
            snap = connwatch.snapshot()
            for _r, w in conns:
                w.close()
                await w.wait_closed()
            srv.close()
            return port, errors, snap

        port, errors, snap = uvloop.run(main())
    finally:
        connwatch.disable()
    (err,) = errors
    assert (err.limit_name, err.upstream) == ("upstream", f"127.0.0.1:{port}")
    (stat,) = [s for s in snap.statistics("callsite") if s.site is not None and s.site.line == _line("BYNAME")]
    assert (stat.role, stat.live, dict(stat.upstreams)) == ("client", 2, {f"127.0.0.1:{port}": 2})


def test_unix_connections_and_servers(agent: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")

    async def main() -> Tuple[Any, Any]:
        srv = await asyncio.start_unix_server(_echo, path)  # UNIXSRV
        conns = [await asyncio.open_unix_connection(path) for _ in range(2)]  # UNIXCONN
        for _r, w in conns:
            w.write(b"x")
            await w.drain()
            await _r.readexactly(1)
        during = agent.snapshot()
        for _r, w in conns:
            w.close()
            await w.wait_closed()
        srv.close()
        await srv.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0.01)
        return during, agent.snapshot()

    during, after = uvloop.run(main())  # UNIXRUN
    assert live_at(during, HERE, _line("UNIXSRV"), "socket", "listener") == 1
    (stat,) = [s for s in during.statistics("callsite") if s.site is not None and s.site.line == _line("UNIXCONN")]
    assert (stat.role, stat.live, dict(stat.upstreams)) == ("client", 2, {f"unix:{path}": 2})
    assert live_at(during, HERE, _line("UNIXRUN"), "socket", "accepted") == 2
    assert _open(after) == 0
    # the listening socket uvloop builds in Python before libuv takes it over is not a second record
    assert [r[0] for r in _rows(after) if r[1] == _line("UNIXSRV")] == ["listener"]


def test_tls_connections_are_counted_and_released(agent: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def main() -> Tuple[Any, Any]:
        srv = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,  # TLS
                                             server_hostname="localhost")
        w.write(b"hello")
        await w.drain()
        assert await r.readexactly(5) == b"hello"
        during = agent.snapshot()
        w.close()
        await w.wait_closed()
        for _ in range(10):
            await asyncio.sleep(0.01)
        srv.close()
        return during, agent.snapshot()

    during, after = uvloop.run(main())  # TLSRUN
    assert live_at(during, HERE, _line("TLS"), "socket", "client") == 1
    assert live_at(during, HERE, _line("TLSRUN"), "socket", "accepted") == 1
    assert live_at(after, HERE, _line("TLS"), "socket") == 0
    assert _open(after, _line("TLSRUN")) == 0


def test_pseudosocket_views_are_not_counted(agent: Any) -> None:
    async def main() -> Any:
        srv = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]  # VIEW
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # VIEW
        assert w.get_extra_info("peername") == ("127.0.0.1", port)  # VIEW
        snap = agent.snapshot()
        w.close()
        await w.wait_closed()
        srv.close()
        return snap

    snap = uvloop.run(main())
    assert [r for r in _rows(snap) if r[1] == _line("VIEW")] == []


def _scenario(run: Callable[[Any], Any], tmp_path: Path) -> List[Tuple[Any, ...]]:
    async def main() -> None:
        srv = await asyncio.start_server(_echo, "127.0.0.1", 0)  # SAME-LISTEN
        port = srv.sockets[0].getsockname()[1]
        kept = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]  # SAME-CONNECT
        for _r, w in kept[:2]:
            w.close()
            await w.wait_closed()
        usrv = await asyncio.start_unix_server(_echo, str(tmp_path / "u.sock"))  # SAME-ULISTEN
        ur, uw = await asyncio.open_unix_connection(str(tmp_path / "u.sock"))  # SAME-UCONNECT
        s = socket.socket()  # SAME-SOCK
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
        sr, sw = await asyncio.open_connection(sock=s)
        ls = socket.socket()  # SAME-LSOCK
        ls.bind(("127.0.0.1", 0))
        ssrv = await asyncio.start_server(_echo, sock=ls)  # asyncio makes it a listener: so does uvloop
        for _ in range(5):
            await asyncio.sleep(0.01)
        snaps.append(connwatch.snapshot())
        for _r, w in [*kept[2:], (ur, uw), (sr, sw)]:
            w.close()
            await w.wait_closed()
        srv.close()
        usrv.close()
        ssrv.close()
        await srv.wait_closed()
        for _ in range(5):
            await asyncio.sleep(0.01)
        snaps.append(connwatch.snapshot())

    snaps: List[Any] = []
    connwatch.enable(dir=str(tmp_path / "snap"), snapshot_interval=0)
    try:
        run(main())  # SAME-RUN
    finally:
        connwatch.disable()
    return [_rows(s) for s in snaps]  # type: ignore[misc]


def test_kinds_and_roles_equal_those_of_the_same_program_under_asyncio(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    drop_agent_env(monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "u").mkdir()
    plain = _scenario(asyncio.run, tmp_path / "a")
    on_uvloop = _scenario(uvloop.run, tmp_path / "u")
    # The loops' own wake-up socketpairs are theirs (asyncio makes one, uvloop one per signal
    # handling): not part of the program's connections.
    plain = [[r for r in rows if r[0] != "pair"] for rows in plain]
    on_uvloop = [[r for r in rows if r[0] != "pair"] for rows in on_uvloop]
    assert on_uvloop == plain
    during = {(r[0], r[1]): r[2] for r in plain[0]}
    assert during[("listener", _line("SAME-LISTEN"))] == 1
    assert during[("client", _line("SAME-CONNECT"))] == 2
    assert during[("listener", _line("SAME-ULISTEN"))] == 1
    assert during[("client", _line("SAME-UCONNECT"))] == 1
    assert during[("client", _line("SAME-SOCK"))] == 1
    assert during[("listener", _line("SAME-LSOCK"))] == 1
    assert during[("accepted", _line("SAME-RUN"))] == 4  # 2 TCP clients left, 1 Unix, 1 sock=
    assert all(r[2] == 0 for r in plain[1])


def test_unpatch_restores_exactly_and_patch_is_idempotent() -> None:
    before = {n: uvloop.Loop.__dict__.get(n, "<missing>") for n in TARGETS}
    assert before == {n: "<missing>" for n in TARGETS}  # inherited from the extension type
    was = uvloop_loop.is_patched()
    uvloop_loop.unpatch()
    try:
        uvloop_loop.patch(uvloop)
        first = {n: uvloop.Loop.__dict__[n] for n in TARGETS}
        uvloop_loop.patch(uvloop)
        assert {n: uvloop.Loop.__dict__[n] for n in TARGETS} == first
        uvloop_loop.unpatch()
        uvloop_loop.unpatch()
        assert {n: uvloop.Loop.__dict__.get(n, "<missing>") for n in TARGETS} == before
        assert uvloop.Loop.create_connection is uvloop.loop.Loop.create_connection
        assert not uvloop_loop.is_patched()
    finally:
        if was:
            uvloop_loop.patch(uvloop)


def test_patched_when_uvloop_is_imported_after_the_agent_starts(tmp_path: Path) -> None:
    code = (
        "import sys, connwatch\n"
        "connwatch.enable(snapshot_interval=0, dir=sys.argv[1])\n"
        "assert 'uvloop' not in sys.modules\n"
        "import uvloop\n"
        "print(getattr(uvloop.Loop.__dict__.get('create_connection'), '__connwatch_patch__', False))\n"
        "connwatch.disable()\n"
        "print('create_connection' in uvloop.Loop.__dict__)\n"
    )
    proc = run_py(["-c", code, str(tmp_path)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]


def test_borrowed_descriptors_go_with_their_connections(agent: Any) -> None:
    async def main() -> Tuple[int, int, int, Any]:
        srv = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _ in range(3):
            await asyncio.sleep(0.01)  # the accepted ends are made
        before = len(stdlib_socket.borrowed)
        # a view: every connection's descriptor is looked up and lent first, so it is not counted
        conns[0][1].get_extra_info("socket").getsockname()  # LENT-VIEW
        during = len(stdlib_socket.borrowed)
        snap = agent.snapshot()
        for _r, w in conns:
            w.close()
            await w.wait_closed()
        srv.close()
        await srv.wait_closed()
        for _ in range(5):
            await asyncio.sleep(0.01)
        return before, during, len(stdlib_socket.borrowed), snap

    before, during, after, snap = uvloop.run(main())
    assert before == 1  # the listener; connections are looked up only when a view could need them
    assert during == 1 + 3 + 3  # the listener, the clients and the accepted ends
    assert after == 0
    assert [r for r in _rows(snap) if r[1] == _line("LENT-VIEW")] == []


def test_a_view_after_its_connection_closed_lends_nothing_stale(agent: Any) -> None:
    async def main() -> Tuple[int, int]:
        srv = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _r, w in conns:
            w.close()
            await w.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0.01)
        s = socket.socket()
        view = socket.socket(fileno=s.fileno())  # a socket on an existing descriptor: the lenders run
        view.detach()
        s.close()
        during = len(uvloop_loop._unlent), len(stdlib_socket.borrowed)
        srv.close()
        await srv.wait_closed()
        return during

    unlent, borrowed = uvloop.run(main())
    assert unlent == 0
    assert borrowed == 1  # only the listener: the closed connections lent nothing
