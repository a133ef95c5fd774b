"""The core is stdlib-only, the client patches import nothing but their library, and the
disabled hook imports nothing of ours."""

from __future__ import annotations

import json
import os
import pkgutil
import sys

from tests.conftest import run_py

CORE = ["connwatch", "connwatch._callsite", "connwatch._registry", "connwatch._snapshot",
        "connwatch._limits", "connwatch._upstream", "connwatch._config", "connwatch._forksafe", "connwatch._fds",
        "connwatch._log", "connwatch._importhook", "connwatch.bootstrap", "connwatch._retainers",
        "connwatch._canary", "connwatch._promsource"]


def _stdlib() -> set:
    if hasattr(sys, "stdlib_module_names"):  # 3.10+
        return set(sys.stdlib_module_names)
    # 3.9: the modules in the standard library's folders, and those built into the interpreter
    folders = [os.path.dirname(os.__file__), *(p for p in sys.path if p.endswith("lib-dynload"))]
    return {m.name for m in pkgutil.iter_modules(folders)} | set(sys.builtin_module_names)


STDLIB = _stdlib()


def test_core_imports_no_third_party_package() -> None:
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        f"for m in {CORE!r}: __import__(m)\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    proc = run_py(["-c", code])
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert "connwatch._registry" in loaded
    third = sorted({m.split(".")[0] for m in loaded} - STDLIB - {"connwatch"})
    assert third == [], f"core imported third-party packages: {third}"


def test_enabled_agent_start_imports_no_third_party_package(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys, json, socket\n"
        "s = socket.socket()\n"
        "import connwatch\n"
        "assert connwatch.is_enabled()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    base = run_py(["-c", code.replace("assert connwatch", "assert not connwatch")])
    assert base.returncode == 0, base.stderr
    proc = run_py(["-c", code], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    added = set(json.loads(proc.stdout)) - set(json.loads(base.stdout))
    third = sorted({m.split(".")[0] for m in added} - STDLIB - {"connwatch"})
    assert third == [], f"agent start-up imported {third}"


def test_client_patches_import_no_third_party_package(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys, json, connwatch\n"
        "import requests, urllib3, httpx, aiohttp, grpc\n"
        "grpc.insecure_channel('127.0.0.1:1').close()\n"
        "names = ('requests_session', 'urllib3_pool', 'httpx_client', 'aiohttp_session', 'grpc_channel')\n"
        "mods = [sys.modules.get('connwatch.patches.' + n) for n in names]\n"
        "assert all(m is not None and m.is_patched() for m in mods) if connwatch.is_enabled() else not any(mods)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    base = run_py(["-c", code])
    assert base.returncode == 0, base.stderr
    proc = run_py(["-c", code], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    added = set(json.loads(proc.stdout)) - set(json.loads(base.stdout))
    assert "connwatch.patches._common" in added
    third = sorted({m.split(".")[0] for m in added} - STDLIB - {"connwatch"})
    assert third == [], f"the client patches imported {third}"  # no wrapt (~50 ms to import)


def test_disabled_hook_loads_nothing_and_patches_nothing() -> None:
    code = (
        "import sys, socket, json\n"
        "print(json.dumps([any(m.startswith('connwatch') for m in sys.modules),\n"
        "                  getattr(socket.socket.__init__, '__connwatch_patch__', False)]))\n"
    )
    for value in ("", "0", "false", "no", "garbage"):
        proc = run_py(["-c", code], CONNWATCH_ENABLED=value)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [False, False], value
        assert proc.stderr == ""


def test_core_modules_import_nothing_above_them() -> None:
    # The layers point down only: the cap policy names upstreams through _upstream, not through
    # the socket patch (which imports _limits): no import circle, and no patch loaded by the core.
    code = (
        "import sys, json\n"
        "import connwatch._limits, connwatch._upstream, connwatch._snapshot, connwatch._leaks\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('connwatch.'))))\n"
    )
    proc = run_py(["-c", code])
    assert proc.returncode == 0, proc.stderr
    above = [m for m in json.loads(proc.stdout) if m.startswith(("connwatch.patches", "connwatch.cli",
                                                                  "connwatch.exporters"))]
    assert above == [], f"core modules imported {above}"
