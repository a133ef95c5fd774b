"""grpc channels however they are made: module functions, direct construction, classes and
functions bound before the agent started, interceptors (not counted twice), aio."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc
import pytest
from grpc import _channel as early_channel_module
from grpc import insecure_channel as early_insecure_channel  # bound before the agent starts

from connwatch.patches.grpc_channel import target_upstream
from tests.conftest import live_at
from tests.patches.grpc_server import METHOD


class _PassThrough(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


class _AioPassThrough(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


def _here(agent: Any) -> dict:
    return {(s.kind, s.site.line): (s.live, s.created, s.closed, s.gc_released, s.upstreams)
            for s in agent.snapshot().statistics() if s.site and s.site.file == __file__}


def _line_of(marker: str) -> int:
    with open(__file__) as f:
        for n, text in enumerate(f, 1):
            if text.rstrip().endswith("# " + marker):
                return n
    raise AssertionError(marker)


def test_every_way_of_making_a_channel_counts_once(agent: Any, grpc_server: Any) -> None:
    t = grpc_server.target
    up = ((t, 1),)
    a = grpc.insecure_channel(t)  # m-insecure
    b = grpc.secure_channel(t, grpc.local_channel_credentials())  # m-secure
    c = early_channel_module.Channel(t, (), None, None)  # m-direct
    d = early_insecure_channel(t)  # m-early
    e = grpc.intercept_channel(d, _PassThrough())  # m-intercept
    assert e.unary_unary(METHOD)(b"x", timeout=10) == b"x"
    here = _here(agent)
    assert here == {("grpc.Channel", _line_of(m)): (1, 1, 0, 0, up)
                    for m in ("m-insecure", "m-secure", "m-direct", "m-early")}
    e.close()  # closes the channel it wraps
    for ch in (a, b, c):
        ch.close()
    assert all(v[:4] == (0, 1, 1, 0) for v in _here(agent).values())


def test_channel_gc_release_and_stub_keeps_it(agent: Any, grpc_server: Any) -> None:
    ch = grpc.insecure_channel(grpc_server.target)  # m-stub
    call = ch.unary_unary(METHOD)
    del ch
    gc.collect()
    # The callable holds the channel's C core, not the Python Channel: grpc itself frees it.
    assert call(b"y", timeout=10) == b"y"
    assert _here(agent)[("grpc.Channel", _line_of("m-stub"))][:4] == (0, 1, 1, 1)


def test_aio_channel_with_interceptor_is_one_client(agent: Any, grpc_aio_server: Any) -> None:
    async def main() -> None:
        ch = grpc.aio.insecure_channel(grpc_aio_server.target,  # m-aio
                                       interceptors=[_AioPassThrough()])
        assert await ch.unary_unary(METHOD)(b"z", timeout=10) == b"z"
        assert live_at(agent.snapshot(), __file__, _line_of("m-aio"), "grpc.aio.Channel") == 1
        await ch.close()
        await ch.close()  # a second close changes nothing

    asyncio.run(main())
    assert _here(agent)[("grpc.aio.Channel", _line_of("m-aio"))][:4] == (0, 1, 1, 0)


@pytest.mark.parametrize(("target", "upstream"), [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("dns:///svc.example:443", "svc.example:443"),
    ("dns://8.8.8.8/svc.example:80", "svc.example:80"),
    ("ipv4:127.0.0.1:5,127.0.0.2:6", "127.0.0.1:5"),
    ("ipv6:[::1]:50051", "[::1]:50051"),
    ("[::1]:9", "[::1]:9"),
    ("svc.example", "svc.example:443"),
    ("user:pw@svc.example:7?token=s", "svc.example:7"),
    ("unix:/tmp/s.sock", "unix:/tmp/s.sock"),
    ("unix:///tmp/s.sock", "unix:/tmp/s.sock"),
    ("unix-abstract:name", "unix:@name"),
    (b"localhost:1", "localhost:1"),
    ("", None),
    (None, None),
])
def test_target_upstream(target: Any, upstream: Any) -> None:
    assert target_upstream(target) == upstream


def test_upstream_by_position_keyword_and_repeat(agent: Any, grpc_server: Any) -> None:
    # The C wrapper reads a target it has seen from the upstream cache (by position or keyword);
    # a new target, or one that is not a str, takes the general path. Same answers either way.
    t = grpc_server.target
    host, _, port = t.rpartition(":")
    chans = [early_channel_module.Channel(t, (), None, None) for _ in range(3)]  # m-pos
    chans += [early_channel_module.Channel(target=t, options=(), credentials=None, compression=None)  # m-kw
              for _ in range(2)]
    chans.append(early_channel_module.Channel(f"dns:///{t}?lb=x", (), None, None))  # m-dns
    chans.append(early_channel_module.Channel(f"ipv4:{host}:{port}".encode(), (), None, None))  # m-bytes
    here = _here(agent)
    assert here[("grpc.Channel", _line_of("m-pos"))][:2] == (3, 3)
    assert here[("grpc.Channel", _line_of("m-pos"))][4] == ((t, 3),)
    assert here[("grpc.Channel", _line_of("m-kw"))][4] == ((t, 2),)
    assert here[("grpc.Channel", _line_of("m-dns"))][4] == ((t, 1),)
    assert here[("grpc.Channel", _line_of("m-bytes"))][4] == ((t, 1),)
    for ch in chans:
        ch.close()
