"""Every client kind against real loopback servers: N live at the constructing line, close
releases, a dropped client is released by GC, temporary clients leave nothing, and one shared
client used for many requests keeps a flat count."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import aiohttp
import grpc
import httpx
import pytest
import requests
import urllib3

from tests.conftest import live_at
from tests.patches.grpc_server import METHOD

N = 3


class Ctx:
    """Where the servers are."""

    def __init__(self, http: Any, grpc_sync: Any, grpc_aio: Any) -> None:
        self.host = http.host
        self.port = http.port
        self.url = f"http://{http.host}:{http.port}/"
        self.upstream = http.upstream
        self.grpc = grpc_sync.target
        self.grpc_aio = grpc_aio.target


@pytest.fixture
def ctx(http_server: Any, grpc_server: Any, grpc_aio_server: Any) -> Ctx:
    return Ctx(http_server, grpc_server, grpc_aio_server)


def _rpc(ch: Any) -> Any:
    return ch.unary_unary(METHOD)(b"ping", timeout=10)


# kind -> (make, use, close, expected upstream). ``make`` is a one-line lambda: its line is the
# call site the client must be counted at.
SYNC: Dict[str, Tuple[Callable[[Ctx], Any], Optional[Callable[[Any, Ctx], Any]], Callable[[Any], Any],
                      Callable[[Ctx], Optional[str]]]] = {
    "requests.Session": (
        lambda c: requests.Session(),
        lambda s, c: s.get(c.url, timeout=10).content, lambda s: s.close(), lambda c: None),
    "urllib3.PoolManager": (
        lambda c: urllib3.PoolManager(),
        lambda p, c: p.request("GET", c.url).data, lambda p: p.clear(), lambda c: None),
    "urllib3.ProxyManager": (
        lambda c: urllib3.ProxyManager(c.url),
        lambda p, c: p.request("GET", c.url).data, lambda p: p.clear(), lambda c: c.upstream),
    "urllib3.HTTPConnectionPool": (
        lambda c: urllib3.HTTPConnectionPool(c.host, c.port),
        lambda p, c: p.request("GET", "/").data, lambda p: p.close(), lambda c: c.upstream),
    "urllib3.HTTPSConnectionPool": (
        lambda c: urllib3.HTTPSConnectionPool(c.host, c.port),
        None, lambda p: p.close(), lambda c: c.upstream),  # no TLS server: constructed only
    "httpx.Client": (
        lambda c: httpx.Client(base_url=c.url),
        lambda cl, c: cl.get("/").content, lambda cl: cl.close(), lambda c: c.upstream),
    "grpc.Channel": (
        lambda c: grpc.insecure_channel(c.grpc),
        lambda ch, c: _rpc(ch), lambda ch: ch.close(), lambda c: c.grpc),
}

ASYNC: Dict[str, Tuple[Callable[[Ctx], Any], Callable[[Any, Ctx], Any], Callable[[Any], Any],
                       Callable[[Ctx], Optional[str]]]] = {
    "aiohttp.ClientSession": (
        lambda c: aiohttp.ClientSession(base_url=c.url),
        lambda s, c: _aiohttp_get(s), lambda s: s.close(), lambda c: c.upstream),
    "httpx.AsyncClient": (
        lambda c: httpx.AsyncClient(base_url=c.url),
        lambda cl, c: cl.get("/"), lambda cl: cl.aclose(), lambda c: c.upstream),
    "grpc.aio.Channel": (
        lambda c: grpc.aio.insecure_channel(c.grpc_aio),
        lambda ch, c: _rpc(ch), lambda ch: ch.close(), lambda c: c.grpc_aio),
}


async def _aiohttp_get(s: Any) -> bytes:
    async with s.get("/") as r:
        return bytes(await r.read())


def _line(make: Callable[..., Any]) -> int:
    return make.__code__.co_firstlineno


def _stat(agent: Any, make: Callable[..., Any], kind: str) -> Any:
    for s in agent.snapshot().statistics("callsite"):
        if s.kind == kind and s.site and s.site.line == _line(make) and s.site.file == __file__:
            return s
    return None


def _client_kinds_here(agent: Any) -> Dict[str, int]:
    """Live non-socket clients per kind at call sites in this file."""
    out: Dict[str, int] = {}
    for s in agent.snapshot().statistics("callsite"):
        if s.kind != "socket" and s.site and s.site.file == __file__ and s.live:
            out[s.kind] = out.get(s.kind, 0) + s.live
    return out


# --- sync kinds -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SYNC))
def test_n_live_at_constructing_line_then_close(agent: Any, ctx: Ctx, kind: str) -> None:
    make, use, close, upstream = SYNC[kind]
    clients = [make(ctx) for _ in range(N)]
    if use is not None:
        for c in clients:
            use(c, ctx)
    snap = agent.snapshot()
    assert live_at(snap, __file__, _line(make), kind) == N
    # One client per object: nothing nested inside it is counted on its own.
    assert _client_kinds_here(agent) == {kind: N}
    stat = _stat(agent, make, kind)
    expected = upstream(ctx)
    assert stat.upstreams == (((expected, N),) if expected else ())
    for c in clients:
        close(c)
    stat = _stat(agent, make, kind)
    assert (stat.live, stat.created, stat.closed, stat.gc_released) == (0, N, N, 0)
    del clients


@pytest.mark.parametrize("kind", sorted(SYNC))
def test_dropped_without_close_is_released_by_gc(agent: Any, ctx: Ctx, kind: str) -> None:
    make, use, _close, _up = SYNC[kind]
    clients = [make(ctx) for _ in range(N)]
    for c in clients:
        if use is not None:
            use(c, ctx)
    assert live_at(agent.snapshot(), __file__, _line(make), kind) == N
    del clients, c
    gc.collect()
    stat = _stat(agent, make, kind)
    assert (stat.live, stat.created, stat.gc_released) == (0, N, N)


@pytest.mark.parametrize("kind", sorted(k for k in SYNC if SYNC[k][1] is not None))
def test_shared_client_keeps_a_flat_count(agent: Any, ctx: Ctx, kind: str) -> None:
    make, use, close, _up = SYNC[kind]
    client = make(ctx)
    seen = []
    for i in range(20):
        assert use is not None
        use(client, ctx)
        if i % 5 == 4:
            snap = agent.snapshot()
            seen.append((live_at(snap, __file__, _line(make), kind), _client_kinds_here(agent)))
    assert seen == [(1, {kind: 1})] * 4
    # Keep-alive: the client's own connections stay few (sockets are counted on their own).
    assert live_at(agent.snapshot(), __file__, kind="socket", role="client") <= 2
    close(client)
    assert live_at(agent.snapshot(), __file__, _line(make), kind) == 0


def test_requests_get_uses_a_temporary_session(agent: Any, ctx: Ctx) -> None:
    for _ in range(5):
        assert requests.get(ctx.url, timeout=10).status_code == 200
    snap = agent.snapshot()
    stats = [s for s in snap.statistics() if s.kind == "requests.Session" and s.site and s.site.file == __file__]
    assert [(s.live, s.created, s.closed) for s in stats] == [(0, 5, 5)]
    assert _client_kinds_here(agent) == {}


def test_httpx_get_uses_a_temporary_client(agent: Any, ctx: Ctx) -> None:
    for _ in range(3):
        assert httpx.get(ctx.url).status_code == 200
    stats = [s for s in agent.snapshot().statistics() if s.kind == "httpx.Client" and s.site.file == __file__]
    assert [(s.live, s.created, s.closed) for s in stats] == [(0, 3, 3)]


def test_context_manager_exit_releases(agent: Any, ctx: Ctx) -> None:
    with requests.Session() as s:
        s.get(ctx.url, timeout=10)
    with urllib3.PoolManager() as pm:
        pm.request("GET", ctx.url)
    with urllib3.HTTPConnectionPool(ctx.host, ctx.port) as pool:
        pool.request("GET", "/")
    with httpx.Client() as cl:
        cl.get(ctx.url)
    with grpc.insecure_channel(ctx.grpc) as ch:
        _rpc(ch)
    snap = agent.snapshot()
    made = {s.kind: (s.live, s.created, s.closed) for s in snap.statistics() if s.kind != "socket"
            and s.site.file == __file__}
    assert made == {k: (0, 1, 1) for k in ("requests.Session", "urllib3.PoolManager", "urllib3.HTTPConnectionPool",
                                           "httpx.Client", "grpc.Channel")}


# --- async kinds ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(ASYNC))
def test_async_n_live_then_close(agent: Any, ctx: Ctx, kind: str) -> None:
    make, use, close, upstream = ASYNC[kind]

    async def main() -> None:
        clients = [make(ctx) for _ in range(N)]
        for c in clients:
            await use(c, ctx)
        assert live_at(agent.snapshot(), __file__, _line(make), kind) == N
        assert _client_kinds_here(agent) == {kind: N}
        assert _stat(agent, make, kind).upstreams == ((upstream(ctx), N),)
        for c in clients:
            await close(c)
        stat = _stat(agent, make, kind)
        assert (stat.live, stat.created, stat.closed, stat.gc_released) == (0, N, N, 0)

    asyncio.run(main())


@pytest.mark.parametrize("kind", sorted(ASYNC))
def test_async_dropped_is_released_by_gc(agent: Any, ctx: Ctx, kind: str) -> None:
    make, use, _close, _up = ASYNC[kind]

    async def main() -> None:
        clients = [make(ctx) for _ in range(N)]
        for c in clients:
            await use(c, ctx)
        assert live_at(agent.snapshot(), __file__, _line(make), kind) == N
        del clients, c
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        stat = _stat(agent, make, kind)
        assert (stat.live, stat.created, stat.gc_released) == (0, N, N)

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda loop, context: None)  # "Unclosed client session": expected here
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize("kind", sorted(ASYNC))
def test_async_shared_client_keeps_a_flat_count(agent: Any, ctx: Ctx, kind: str) -> None:
    make, use, close, _up = ASYNC[kind]

    async def main() -> None:
        client = make(ctx)
        seen = []
        for i in range(15):
            await use(client, ctx)
            if i % 5 == 4:
                seen.append(_client_kinds_here(agent))
        assert seen == [{kind: 1}] * 3
        await close(client)
        assert _client_kinds_here(agent) == {}

    asyncio.run(main())


def test_async_with_exit_releases(agent: Any, ctx: Ctx) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.get(ctx.url) as r:
                await r.read()
        async with httpx.AsyncClient() as cl:
            await cl.get(ctx.url)
        async with grpc.aio.insecure_channel(ctx.grpc_aio) as ch:
            await _rpc(ch)

    asyncio.run(main())
    made = {s.kind: (s.live, s.created, s.closed) for s in agent.snapshot().statistics() if s.kind != "socket"
            and s.site.file == __file__}
    assert made == {k: (0, 1, 1) for k in ("aiohttp.ClientSession", "httpx.AsyncClient", "grpc.aio.Channel")}


def test_no_upstream_leaks_credentials_or_query(agent: Any, ctx: Ctx) -> None:
    secret = f"http://user:hunter2@{ctx.host}:{ctx.port}/base/?token=abc"
    cl = httpx.Client(base_url=secret)
    pm = urllib3.ProxyManager(secret)
    ch = grpc.insecure_channel(f"dns:///{ctx.host}:{ctx.port}?lb=x")
    ups = {u for s in agent.snapshot().statistics() for u, _n in s.upstreams}
    assert ups == {ctx.upstream}
    assert not any("hunter2" in u or "token" in u or "lb=" in u for u in ups)
    cl.close()
    pm.clear()
    ch.close()


def test_constructor_errors_propagate_and_count_nothing(agent: Any) -> None:
    with pytest.raises(urllib3.exceptions.LocationValueError):
        urllib3.HTTPConnectionPool("")
    with pytest.raises(urllib3.exceptions.ProxySchemeUnknown):
        urllib3.ProxyManager("ftp://127.0.0.1:1")
    assert [s for s in agent.snapshot().statistics() if s.site.file == __file__] == []


def test_cap_refuses_before_the_constructor_runs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import connwatch

    for k in list(os.environ):
        if k.startswith("CONNWATCH_"):
            monkeypatch.delenv(k)
    assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0, cap_per_callsite=2, cap_mode="raise")
    try:
        made = []
        with pytest.raises(connwatch.ClientCapExceeded) as info:
            for _ in range(3):
                made.append(requests.Session())
        assert len(made) == 2
        assert info.value.kind == "requests.Session"
        stats = [s for s in connwatch.snapshot().statistics() if s.site.file == __file__]
        assert [(s.kind, s.live, s.created) for s in stats] == [("requests.Session", 2, 2)]
        for s in made:
            s.close()
        requests.Session().close()  # room again
    finally:
        connwatch.disable()
