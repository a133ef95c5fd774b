"""Call-site attribution: the first user frame, classification, tracebacks, library stacks."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from connwatch import _callsite
from connwatch._callsite import AGENT, STDLIB, THIRD_PARTY, USER


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    _callsite.configure()
    yield
    _callsite.configure()


def here() -> int:
    return sys._getframe(1).f_lineno


def test_classification() -> None:
    assert _callsite.classify(os.__file__) == STDLIB
    assert _callsite.classify(threading.__file__) == STDLIB
    assert _callsite.classify("<frozen importlib._bootstrap>") == STDLIB
    assert _callsite.classify("<string>") == USER
    assert _callsite.classify("/venv/lib/python3.11/site-packages/urllib3/poolmanager.py") == THIRD_PARTY
    assert _callsite.classify("/usr/lib/python3/dist-packages/requests/sessions.py") == THIRD_PARTY
    assert _callsite.classify(_callsite.__file__) == STDLIB
    exporters = os.path.join(os.path.dirname(_callsite.__file__), "exporters", "otlp.py")
    assert _callsite.classify(exporters) == AGENT
    assert _callsite.classify(__file__) == USER


def test_overrides_win() -> None:
    _callsite.configure(library_paths=("*/tests/core/*",), app_paths=("*/site-packages/myapp/*",))
    assert _callsite.classify(__file__) == THIRD_PARTY
    assert _callsite.classify("/venv/lib/python3.11/site-packages/myapp/handlers.py") == USER


def make_site() -> Any:
    return _callsite.find(2)


def test_first_user_frame_through_stdlib() -> None:
    # functools.reduce + a stdlib function on the stack between us and find(): skipped.
    import functools

    line = here() + 1
    site = functools.reduce(lambda acc, _: make_site(), [0], None)
    assert site.file == __file__ and site.function.endswith("<lambda>")
    assert site.line == line
    assert not site.library


def test_one_interned_site_and_one_traceback_per_line() -> None:
    sites = [make_site() for _ in range(3)]
    assert sites[0] is sites[1] is sites[2]
    tb = sites[0].traceback
    assert tb[0] == (__file__, sites[0].line, sites[0].function)
    assert any(fn.endswith("test_one_interned_site_and_one_traceback_per_line") for _f, _l, fn in tb)


def test_traceback_depth_bounded() -> None:
    _callsite.configure(traceback_depth=2)

    def deep(n: int) -> Any:
        return deep(n - 1) if n else make_site()

    assert len(deep(10).traceback) == 2


def test_library_only_stack_is_attributed_to_the_library_and_marked(tmp_path: Path) -> None:
    pkg = tmp_path / "fakelib"
    pkg.mkdir()
    (pkg / "worker.py").write_text(
        "from connwatch import _callsite\n"
        "def run(out):\n"
        "    out.append(_callsite.find(1))\n"
    )
    spec = importlib.util.spec_from_file_location("fakelib_worker", pkg / "worker.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _callsite.configure(library_paths=("*/fakelib/*",))
    out: List[Any] = []
    t = threading.Thread(target=mod.run, args=(out,))
    t.start()
    t.join(10)
    site = out[0]
    assert site.library
    assert site.file == str(pkg / "worker.py") and site.line == 3
    # called from user code, the same library function is attributed to the user's line
    mod.run(out)
    assert out[1].file == __file__ and not out[1].library


def test_agent_threads_are_not_attributed(tmp_path: Path) -> None:
    out: List[Any] = []

    def target() -> None:
        _callsite.register_agent_thread()
        try:
            # a stack with no user frame on an agent thread: the stdlib's own call
            out.append(_callsite.find(0))
        finally:
            _callsite.unregister_agent_thread()

    _callsite.configure(library_paths=(__file__,))
    t = threading.Thread(target=target)
    t.start()
    t.join(10)
    assert out == [None]


def test_site_cardinality_is_bounded() -> None:
    _callsite.configure(max_sites=3)
    code = "\n".join(f"s{i} = find(0)" for i in range(6))
    ns: dict = {"find": _callsite.find}
    exec(compile(code, "<generated>", "exec"), ns)
    files = [ns[f"s{i}"].file for i in range(6)]
    assert files[:3] == ["<generated>"] * 3
    assert files[3:] == [_callsite.OVERFLOW_FILE] * 3
