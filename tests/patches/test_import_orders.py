"""Every import/patch/unpatch order: library imported before or after the agent starts,
enable -> disable -> enable, idempotent patch/unpatch, disabled patches, failing hooks."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Tuple

import aiohttp  # noqa: F401  (imported before the agent starts: the "before" order)
import grpc
import grpc.aio
import httpx  # noqa: F401
import pytest
import requests
import urllib3
from grpc import _channel

from connwatch.patches import aiohttp_session, grpc_channel, httpx_client, requests_session, urllib3_pool
from connwatch.patches._common import Patcher, _resolve, is_wrapper
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


def test_someone_wrapping_over_us_is_left_alone_and_we_go_inert() -> None:
    import wrapt

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


def test_a_failing_wrapper_never_reaches_the_app(quiet_env: None, tmp_path: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import connwatch
    from connwatch import _registry

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("registry exploded")

    assert connwatch.enable(dir=str(tmp_path), snapshot_interval=0)
    try:
        monkeypatch.setattr(_registry, "track", broken)
        monkeypatch.setattr(_registry, "release", broken)
        s = requests.Session()
        s.close()
        pm = urllib3.PoolManager()
        pm.clear()
    finally:
        monkeypatch.undo()
        connwatch.disable()


def test_unknown_action_is_rejected() -> None:
    from connwatch.patches._common import Target

    p = Patcher("x", [Target("requests.sessions", "Session", "close", "bogus")])
    with pytest.raises(ValueError):
        p.patch()
    assert not p.is_patched()
