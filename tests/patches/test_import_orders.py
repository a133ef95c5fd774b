"""Every import/patch/unpatch order: library imported before or after the agent starts,
enable -> disable -> enable, idempotent patch/unpatch, disabled patches, failing hooks; and what
the wrappers are: plain functions that look like the originals, installed on the owner class
over its own, inherited or already-wrapped method."""

from __future__ import annotations

import inspect
import json
import logging
import os
import types
from typing import Any, Dict, Iterator, List, Tuple

import aiohttp  # noqa: F401  (imported before the agent starts: the "before" order)
import grpc
import grpc.aio
import httpx  # noqa: F401
import pytest
import requests
import urllib3
from grpc import _channel

from connwatch.patches import aiohttp_session, grpc_channel, httpx_client, requests_session, urllib3_pool
from connwatch.patches._common import ACLOSE, CLOSE, INIT, Patcher, Target, _resolve, arg, is_wrapper, url_upstream
from tests.conftest import run_py

import sys  # isort: skip

MODULES = (grpc_channel, urllib3_pool, requests_session, httpx_client, aiohttp_session)


def _attrs() -> Dict[Tuple[str, str, str], Any]:
    """What every target owner's own ``__dict__`` holds now."""
    out = {}
    for mod in MODULES:
        for t in mod._TARGETS:
            owner = _resolve(sys.modules[t.module], t.owner)
            assert owner is not None
            out[(t.module, t.owner, t.attr)] = owner.__dict__.get(t.attr, "<missing>")
    return out


@pytest.fixture
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in list(os.environ):
        if k.startswith("CONNWATCH_"):
            monkeypatch.delenv(k)
    yield


def test_enable_disable_enable_restores_exact_originals(quiet_env: None, tmp_path: Any) -> None:
    import connwatch

    originals = _attrs()
    init = _channel.Channel.__init__
    assert not any(is_wrapper(v) for v in originals.values())
    for _ in range(2):
        assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0)
        try:
            now = _attrs()
            assert all(is_wrapper(now[k]) and now[k] is not originals[k] for k in originals)
            assert all(m.is_patched() for m in MODULES)
            s = requests.Session()
            assert [x.kind for x in connwatch.snapshot().statistics() if x.kind != "socket"] == ["requests.Session"]
            s.close()
        finally:
            connwatch.disable()
        assert _attrs() == originals
        assert all(_attrs()[k] is originals[k] for k in originals)
        assert _channel.Channel.__init__ is init
        assert not any(m.is_patched() for m in MODULES)


def test_patch_and_unpatch_are_idempotent() -> None:
    originals = _attrs()
    try:
        for mod in MODULES:
            mod.patch(None)
        first = _attrs()
        for mod in MODULES:
            mod.patch(None)
        assert _attrs() == first
        assert all(first[k] is not originals[k] for k in originals)
    finally:
        for mod in MODULES:
            mod.unpatch()
            mod.unpatch()
    assert all(_attrs()[k] is originals[k] for k in originals)


def test_wrappers_look_like_the_originals() -> None:
    # Plain functions on the pure-Python path (and for async close); the C wrapper type otherwise.
    from connwatch.patches._c import C

    originals = _attrs()
    try:
        for mod in MODULES:
            mod.patch(None)
        for mod in MODULES:
            for t in mod._TARGETS:
                ours, orig = _attrs()[(t.module, t.owner, t.attr)], originals[(t.module, t.owner, t.attr)]
                expected = types.FunctionType if C is None or t.action == ACLOSE else C.Wrapper
                assert type(ours) is expected and is_wrapper(ours) and not is_wrapper(orig)
                assert ours.__wrapped__ is orig
                assert (ours.__name__, ours.__qualname__, ours.__doc__, ours.__module__) == (
                    orig.__name__, orig.__qualname__, orig.__doc__, orig.__module__)
                assert inspect.signature(ours) == inspect.signature(orig)
                # async close stays a coroutine function (asyncio and frameworks check this)
                assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(orig) == (t.action == ACLOSE)
    finally:
        for mod in MODULES:
            mod.unpatch()
    assert all(_attrs()[k] is originals[k] for k in originals)


def _client_kinds(agent: Any) -> Dict[str, int]:
    return {s.kind: s.live for s in agent.snapshot().statistics() if s.kind != "socket" and s.live}


def test_unbound_and_super_calls_are_wrapped(agent: Any) -> None:
    class Manager(urllib3.PoolManager):
        def __init__(self) -> None:
            urllib3.PoolManager.__init__(self, num_pools=2)  # unbound, through the class

    class Session(requests.Session):
        def __init__(self) -> None:
            super().__init__()

    pm, s = Manager(), Session()
    assert _client_kinds(agent) == {"urllib3.PoolManager": 1, "requests.Session": 1}
    urllib3.PoolManager.clear(pm)
    requests.Session.close(s)
    assert _client_kinds(agent) == {}


# A library whose rows are not all plain functions of the owner's own __dict__.
class _Base:
    def close(self, how: str = "nicely") -> str:
        """Close it."""
        return f"closed {how}"


class _Client(_Base):
    def __init__(self, url: Any = None) -> None:
        self.url = url

    @staticmethod
    def make() -> str:
        return "static"

    @classmethod
    def build(cls) -> str:
        return "class"

    @property
    def state(self) -> str:
        return "prop"


def _fake_library(monkeypatch: pytest.MonkeyPatch) -> Patcher:
    lib = types.ModuleType("fake_client_lib")
    lib.Client = _Client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_client_lib", lib)
    rows = [Target("fake_client_lib", "Client", "__init__", INIT, "fake.Client"),
            Target("fake_client_lib", "Client", "close", CLOSE, "fake.Client")]  # inherited from _Base
    rows += [Target("fake_client_lib", "Client", attr, CLOSE, "fake.Client")
             for attr in ("make", "build", "state", "missing")]
    return Patcher("fake", rows, upstream={"fake.Client": lambda a, k: url_upstream(arg(a, k, 0, "url"))})


def test_inherited_methods_are_wrapped_and_descriptors_skipped_with_one_warning(
        agent: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    patcher = _fake_library(monkeypatch)
    before = dict(_Client.__dict__)
    base_close = _Base.__dict__["close"]
    with caplog.at_level(logging.WARNING, logger="connwatch"):
        patcher.patch()
        patcher.patch()  # idempotent: no second warning either
    try:
        warned = [r.getMessage() for r in caplog.records if "connwatch can wrap" in r.getMessage()]
        assert len(warned) == 4 and all("fake.Client" in w for w in warned), warned
        assert sorted(a for _, a in patcher.wrapped_attrs()) == ["__init__", "close"]
        assert "close" in _Client.__dict__ and _Base.__dict__["close"] is base_close
        assert _Client.close.__wrapped__ is base_close and _Client.close.__doc__ == "Close it."
        for attr in ("make", "build", "state"):
            assert _Client.__dict__[attr] is before[attr]
        c = _Client("http://user:pw@example.test:8080/x?q=1")
        assert (_Client.make(), _Client.build(), c.state) == ("static", "class", "prop")
        [st] = [s for s in agent.snapshot().statistics("upstream") if s.kind == "fake.Client"]
        assert (st.live, st.upstream) == (1, "example.test:8080")
        assert c.close("now") == "closed now"
        assert _client_kinds(agent) == {}
    finally:
        patcher.unpatch()
    assert dict(_Client.__dict__) == before and "close" not in _Client.__dict__  # ours deleted, _Base's shows
    assert _Client.close is base_close


def test_a_method_proxy_installed_before_us_is_called_bound(quiet_env: None, tmp_path: Any) -> None:
    wrapt = pytest.importorskip("wrapt")  # another instrumentation (OpenTelemetry's aiohttp one, say)
    import connwatch

    seen: List[Any] = []

    def theirs(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        seen.append((wrapped.__name__, instance))
        return wrapped(*args, **kwargs)

    originals = {a: requests.Session.__dict__[a] for a in ("__init__", "close")}
    try:
        for attr in originals:
            wrapt.wrap_function_wrapper(requests.Session, attr, theirs)
        proxies = {a: requests.Session.__dict__[a] for a in originals}
        assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0)
        try:
            assert all(requests.Session.__dict__[a].__wrapped__ is proxies[a] for a in originals)
            s = requests.Session()
            assert [(x.kind, x.live) for x in connwatch.snapshot().statistics() if x.kind != "socket"] == [
                ("requests.Session", 1)]
            s.close()
            assert seen == [("__init__", s), ("close", s)]  # their wrapper still sees the instance
            assert connwatch.snapshot().live == 0
        finally:
            connwatch.disable()
        assert all(requests.Session.__dict__[a] is proxies[a] for a in originals)
    finally:
        for attr, fn in originals.items():
            setattr(requests.Session, attr, fn)


def test_someone_replacing_ours_is_left_alone_and_we_go_inert(caplog: pytest.LogCaptureFixture) -> None:
    from connwatch import _log

    _log.reset()
    original = requests.Session.__dict__["close"]
    requests_session.patch(None)
    try:
        ours = requests.Session.__dict__["close"]
        calls: List[Any] = []

        def theirs(self: Any) -> None:  # a plain monkey-patch over ours
            calls.append(self)
            ours(self)

        requests.Session.close = theirs  # type: ignore[method-assign]
    finally:
        with caplog.at_level(logging.WARNING, logger="connwatch"):
            requests_session.unpatch()
            requests_session.unpatch()
    assert requests.Session.__dict__["close"] is theirs
    assert len([r for r in caplog.records if "re-wrapped by someone else" in r.getMessage()]) == 1
    s = requests.Session()
    s.close()  # still works, through their function and our disarmed one
    assert calls == [s]
    requests.Session.close = original  # type: ignore[method-assign]
    _log.reset()


def test_someone_wrapping_over_us_is_left_alone_and_we_go_inert() -> None:
    wrapt = pytest.importorskip("wrapt")

    original = requests.Session.__dict__["close"]
    requests_session.patch(None)
    try:
        wrapt.wrap_function_wrapper(requests.Session, "close", lambda w, i, a, k: w(*a, **k))
        theirs = requests.Session.__dict__["close"]
    finally:
        requests_session.unpatch()
    assert requests.Session.__dict__["close"] is theirs
    requests.Session().close()  # still works, through their wrapper and our disarmed one
    requests.Session.close = original  # type: ignore[method-assign]
    assert requests.Session.__dict__["close"] is original


def test_disabled_patches_are_skipped(quiet_env: None, tmp_path: Any) -> None:
    import connwatch

    assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0, disabled_patches="grpc, urllib3")
    try:
        assert not grpc_channel.is_patched() and not urllib3_pool.is_patched()
        assert requests_session.is_patched() and httpx_client.is_patched()
        ch = grpc.insecure_channel("127.0.0.1:1")
        pm = urllib3.PoolManager()
        assert [s for s in connwatch.snapshot().statistics() if s.kind != "socket"] == []
        ch.close()
        pm.clear()
    finally:
        connwatch.disable()


AFTER = """
import json, sys, asyncio, connwatch
connwatch.enable(snapshot_interval=0, dir=sys.argv[1])
assert "grpc" not in sys.modules and "urllib3" not in sys.modules
import grpc, urllib3, requests, httpx, aiohttp
from connwatch.patches import grpc_channel, urllib3_pool, requests_session, httpx_client, aiohttp_session
assert "grpc._channel" not in sys.modules  # grpc imports it lazily, in insecure_channel
keep = [grpc.insecure_channel("127.0.0.1:1"), urllib3.PoolManager(), requests.Session(), httpx.Client()]
async def main():
    keep.append(aiohttp.ClientSession())
    keep.append(grpc.aio.insecure_channel("127.0.0.1:1"))
    keep.append(httpx.AsyncClient())
asyncio.run(main())
rows = sorted([s.kind, s.site.line, s.live] for s in connwatch.snapshot().statistics()
              if s.kind != "socket" and s.site.file == __file__)
print(json.dumps(rows))
"""


def test_libraries_imported_after_the_agent_starts(tmp_path: Any) -> None:
    script = tmp_path / "app.py"
    script.write_text(AFTER)
    proc = run_py([str(script), str(tmp_path / "snap")], timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert rows == sorted([
        ["grpc.Channel", 8, 1], ["urllib3.PoolManager", 8, 1], ["requests.Session", 8, 1], ["httpx.Client", 8, 1],
        ["aiohttp.ClientSession", 10, 1], ["grpc.aio.Channel", 11, 1], ["httpx.AsyncClient", 12, 1],
    ])


FAILING = """
import sys, connwatch
connwatch.enable(snapshot_interval=0, dir=sys.argv[1])
import connwatch.patches.{mod} as p
def boom(module=None):
    raise RuntimeError("patch exploded")
p.patch = boom
import {lib}
{use}
print("imported", {lib}.__name__)
"""


@pytest.mark.parametrize(("mod", "lib", "use"), [
    ("urllib3_pool", "urllib3", "urllib3.PoolManager().clear()"),
    ("grpc_channel", "grpc", "grpc.insecure_channel('127.0.0.1:1').close()"),
])
def test_a_failing_patch_does_not_break_the_import(tmp_path: Any, mod: str, lib: str, use: str) -> None:
    script = tmp_path / "app.py"
    script.write_text(FAILING.format(mod=mod, lib=lib, use=use))
    proc = run_py([str(script), str(tmp_path / "snap")], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"imported {lib}"
    assert "internal error" in proc.stderr and "patch exploded" in proc.stderr


def test_a_failing_wrapper_never_reaches_the_app(quiet_env: None, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import connwatch
    from connwatch import _log, _registry
    from connwatch.patches._c import C

    calls: List[Any] = []

    def broken(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise RuntimeError("registry exploded")

    # Before enable(): the wrappers bind what they call when they are installed.
    if C is None:
        monkeypatch.setattr(_registry, "track", broken)
        monkeypatch.setattr(_registry, "release", broken)
    else:  # the C wrappers call the C registry directly; it calls this hook after each track
        monkeypatch.setattr(_registry, "on_track", broken)
    # The wrapper's own work fails too: the upstream of a pool the app builds.
    monkeypatch.setitem(urllib3_pool._patcher.upstream, "urllib3.HTTPConnectionPool", broken)
    _log.reset()
    assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0)
    try:
        with caplog.at_level(logging.WARNING, logger="connwatch"):
            s = requests.Session()
            s.close()
            pm = urllib3.PoolManager()
            pm.clear()
            pool = urllib3.HTTPConnectionPool("127.0.0.1", 1)
            pool.close()
        assert {a[0] for a in calls} >= {s, pm}  # the wrappers did call the broken registry
        assert (("127.0.0.1", 1), {}) in calls  # and the upstream function
        assert "registry exploded" in caplog.text and "Traceback" in caplog.text
    finally:
        connwatch.disable()
        monkeypatch.undo()


def test_unknown_action_is_rejected() -> None:
    from connwatch.patches._common import Target

    p = Patcher("x", [Target("requests.sessions", "Session", "close", "bogus")])
    with pytest.raises(ValueError):
        p.patch()
    assert not p.is_patched()
