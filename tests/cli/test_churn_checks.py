"""Churn in tests: ``connwatch.guard(max_created=N)``, ``@pytest.mark.connwatch(max_created=N)``
and the ini default fail when one call site builds more than N clients, even if every one was
closed; the error names the site ``file:line (function)`` with its count. Real processes, a
real HTTP server."""

from __future__ import annotations

import os
import re
import textwrap
from typing import Any

import pytest

from tests.conftest import REPO, run_py

GUARD = '''
import os, sys
import requests
import connwatch

url = os.environ["URL"]
session = requests.Session()


def per_call():
    for _ in range(20):
        requests.get(url, timeout=10).close()  # CHURN-LINE


def shared():
    for _ in range(20):
        session.get(url, timeout=10).close()


try:
    with connwatch.guard(max_created=5):
        per_call()
except connwatch.ChurnError as e:
    assert isinstance(e, connwatch.LeakError) and not e.leaks
    kinds = sorted((c.label(), c.created) for c in e.churned)
    assert ("requests.Session", 20) in kinds, kinds
    print("CHURN:", e)
else:
    sys.exit("no ChurnError")

session.get(url, timeout=10).close()  # its kept connection opens here, before the block
with connwatch.guard(max_created=5):
    shared()  # one Session for all twenty calls, one kept connection
with connwatch.guard(max_created=20):
    per_call()  # within the budget
with connwatch.guard():
    per_call()  # no max_created: closed clients are no leak
session.close()
print("OK")
'''

PLUGIN_TESTS = '''
import os
import pytest
import requests

URL = os.environ["URL"]


@pytest.mark.connwatch(max_created=5)
def test_client_per_call():
    for _ in range(8):
        requests.get(URL, timeout=10).close()  # PLUGIN-CHURN


@pytest.mark.connwatch(max_created=5)
def test_shared_session():
    with requests.Session() as s:
        for _ in range(8):
            s.get(URL, timeout=10).close()


def test_default_from_ini():
    for _ in range(4):
        requests.get(URL, timeout=10).close()  # INI-CHURN


@pytest.mark.connwatch(max_created=10)
def test_marker_raises_the_budget():
    for _ in range(4):
        requests.get(URL, timeout=10).close()
'''


def _line(text: str, marker: str) -> int:
    return next(i for i, ln in enumerate(textwrap.dedent(text).strip("\n").splitlines(), 1) if marker in ln)


def test_guard_max_created_names_the_line(tmp_path: Any, http_server: Any) -> None:
    script = tmp_path / "churny.py"
    script.write_text(textwrap.dedent(GUARD).strip("\n") + "\n")
    proc = run_py([str(script)], CONNWATCH_DIR=str(tmp_path / "snaps"), URL=f"http://{http_server.target}/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where = f"{script}:{_line(GUARD, 'CHURN-LINE')} (per_call)"
    assert f"20 requests.Session created at {where} (0 live there now): share one requests.Session" in proc.stdout
    assert "more than max_created=5 clients" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")


def test_pytest_marker_and_ini_default(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                       http_server: Any) -> None:
    for k in list(os.environ):
        if k.startswith(("CONNWATCH_", "PYTEST_ADDOPTS")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("URL", f"http://{http_server.target}/")
    pytester.makepyfile(test_churny=PLUGIN_TESTS)
    pytester.makeini("[pytest]\nconnwatch = true\nconnwatch_max_created = 3\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    out = result.stdout.str()
    assert result.parseoutcomes() == {"failed": 2, "passed": 2}, out
    result.stdout.fnmatch_lines(["FAILED test_churny.py::test_client_per_call*",
                                 "FAILED test_churny.py::test_default_from_ini*"])
    line = _line(PLUGIN_TESTS, "PLUGIN-CHURN")
    assert re.search(rf"8 requests.Session created at \S*test_churny.py:{line} \(test_client_per_call\)", out), out
    assert "more than max_created=5 clients" in out and "more than max_created=3 clients" in out
    assert re.search(rf"4 requests.Session created at \S*test_churny.py:{_line(PLUGIN_TESTS, 'INI-CHURN')}", out)
    # Bad settings are a usage error, not a silent no-op.
    pytester.makeini("[pytest]\nconnwatch = true\nconnwatch_max_created = lots\n")
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    assert bad.ret != 0 and "connwatch_max_created must be a whole number" in bad.stderr.str() + bad.stdout.str()
