"""The pytest plugin (entry point ``pytest11``), run with ``pytester`` in real subprocesses on
a test file that leaks and one that doesn't; and ``connwatch.guard()`` in a real process."""

from __future__ import annotations

import os
import re
import textwrap
from typing import Any

import pytest

from tests.conftest import REPO, run_py

LEAKY = '''
import socket
import threading

import pytest

held = []


def test_clean():
    s = socket.socket()
    s.close()


def test_leaks_a_pair():
    a, b = socket.socketpair()  # LEAK-LINE
    held.append((a, b))


@pytest.fixture
def client():
    s = socket.socket()
    yield s
    s.close()


def test_fixture_closes_it(client):
    assert client.fileno() >= 0


@pytest.fixture(scope="module")
def shared():
    s = socket.socket()
    yield s
    s.close()


def test_module_fixture_first(shared):
    pass


def test_module_fixture_second(shared):
    pass


def test_closed_asynchronously():
    s = socket.socket()
    threading.Timer(0.15, s.close).start()


@pytest.mark.connwatch(allow=2)
def test_allowed_by_count():
    held.append(socket.socketpair())


@pytest.mark.connwatch(allow={"socket/pair": 2})
def test_allowed_by_kind():
    held.append(socket.socketpair())


@pytest.mark.connwatch(allow={"socket/pair": 1})
def test_allowance_too_small():
    held.append(socket.socketpair())  # SMALL-LINE


@pytest.mark.connwatch(check=False)
def test_not_checked():
    held.append(socket.socketpair())


def known_leak_helper():
    return socket.socket()


def test_ignored_by_ini():
    held.append(known_leak_helper())


def test_fails_on_its_own():
    held.append(socket.socket())
    assert False, "the test's own failure"
'''

CLEAN = '''
import socket

import connwatch


def test_one():
    with socket.socket() as s:
        assert s.fileno() >= 0


def test_agent_state():
    import os
    assert connwatch.is_enabled() == (os.environ.get("EXPECT_AGENT") == "1")
'''


def _line(marker: str) -> int:
    return next(i for i, ln in enumerate(LEAKY.strip().splitlines(), 1) if marker in ln)


@pytest.fixture
def tester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for k in list(os.environ):
        if k.startswith(("CONNWATCH_", "PYTEST_ADDOPTS")):
            monkeypatch.delenv(k)
    # The subprocess imports this checkout's connwatch; the plugin is found through the
    # installed distribution's pytest11 entry point, as users get it.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makepyfile(test_leaky=LEAKY, test_clean=CLEAN)
    return pytester


def _outcomes(result: pytest.RunResult) -> Any:
    return result.parseoutcomes()


def test_plugin_fails_leaking_tests_only(tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPECT_AGENT", "1")
    tester.makeini("[pytest]\nconnwatch_ignore =\n    known_leak_helper\n")
    result = tester.runpytest_subprocess("--connwatch", "-p", "no:cacheprovider", timeout=120)
    out = result.stdout.str()
    outcomes = _outcomes(result)
    # Leaks count as failures of their tests; the failing test is not reported twice.
    assert outcomes.get("failed") == 3, out  # two leaks and one plain failure
    assert "error" not in outcomes and "errors" not in outcomes, out
    assert outcomes.get("passed") == 11, out
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "FAILED test_leaky.py::test_leaks_a_pair*",
        "FAILED test_leaky.py::test_allowance_too_small*",
        "FAILED test_leaky.py::test_fails_on_its_own*",
    ])
    where = f"test_leaky.py:{_line('LEAK-LINE')} (test_leaks_a_pair)"
    assert re.search(r"\+2 socket/pair at \S*" + re.escape(where), out), out
    assert "traceback (most recent call last):" in out
    assert re.search(rf"test_leaky.py:{_line('SMALL-LINE')} in test_allowance_too_small", out)
    assert re.search(rf"\+1 socket/pair at \S*test_leaky.py:{_line('SMALL-LINE')}", out)
    assert "(known_leak_helper)" not in out  # ignored through the ini list
    # Session summary.
    # Checked: all but the check=False test and the test that failed on its own.
    assert "connwatch: 12 tests checked, 2 left 3 live clients behind" in out, out
    assert "test_agent_state" not in out  # passed: the plugin turned the agent on


def test_plugin_is_opt_in(tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPECT_AGENT", "0")
    result = tester.runpytest_subprocess("-p", "no:cacheprovider", "test_leaky.py", "test_clean.py", timeout=120)
    outcomes = _outcomes(result)
    assert outcomes.get("failed") == 1 and outcomes.get("passed") == 13, result.stdout.str()
    assert "connwatch: " not in result.stdout.str()
    # The marker is registered even when the check is off (no unknown-marker warning).
    result = tester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", "test_leaky.py", timeout=120)
    assert _outcomes(result).get("failed") == 1, result.stdout.str()


def test_plugin_ini_switch_and_grace(tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPECT_AGENT", "1")
    tester.makeini("[pytest]\nconnwatch = true\nconnwatch_grace = 0\n")
    result = tester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    out = result.stdout.str()
    # Without a grace period the socket closed 0.15 s later is reported; the ignore list is
    # empty, so the helper's client is too.
    result.stdout.fnmatch_lines([
        "FAILED test_leaky.py::test_closed_asynchronously*",
        "FAILED test_leaky.py::test_ignored_by_ini*",
    ])
    assert _outcomes(result).get("failed") == 5, out
    assert "(known_leak_helper)" in out
    assert "test_agent_state" not in out  # the plugin turned the agent on


def test_plugin_clean_file_passes(tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPECT_AGENT", "1")
    result = tester.runpytest_subprocess("--connwatch", "-p", "no:cacheprovider", "test_clean.py", timeout=120)
    assert result.ret == 0, result.stdout.str()
    assert _outcomes(result) == {"passed": 2}
    assert "connwatch: 2 tests checked, no leaked network clients" in result.stdout.str()


GUARD = '''
import socket
import sys

import connwatch

assert not connwatch.is_enabled()
with connwatch.guard():  # starts the agent
    s = socket.socket()
    s.close()
assert connwatch.is_enabled()

held = []
try:
    with connwatch.guard(grace=0.1):
        held.append(socket.socketpair())  # GUARD-LEAK
except connwatch.LeakError as e:
    assert isinstance(e, AssertionError)
    assert len(e.leaks) == 1 and e.leaks[0].count == 2 and e.leaks[0].label() == "socket/pair"
    print("LEAK:", e)
else:
    sys.exit("no LeakError")


@connwatch.guard(allow={"socket/pair": 2})
def allowed():
    held.append(socket.socketpair())


allowed()


@connwatch.guard(grace=0.05)
def leaky():
    held.append(socket.socket())


try:
    leaky()
except connwatch.LeakError as e:
    print("DECORATED:", e.leaks[0].where())
else:
    sys.exit("decorator did not raise")

# An error inside the block wins over the leak.
try:
    with connwatch.guard():
        held.append(socket.socket())
        raise KeyError("own error")
except KeyError:
    print("OWN ERROR KEPT")
print("OK")
'''


def test_guard_in_a_real_process(tmp_path: Any) -> None:
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent(GUARD))
    proc = run_py([str(script)], CONNWATCH_DIR=str(tmp_path / "snaps"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(i for i, ln in enumerate(GUARD.splitlines(), 1) if "GUARD-LEAK" in ln)
    assert f"+2 socket/pair at {script}:{line} (<module>)" in proc.stdout
    assert "DECORATED: " + str(script) in proc.stdout and "(leaky)" in proc.stdout
    assert "OWN ERROR KEPT" in proc.stdout and proc.stdout.rstrip().endswith("OK")
