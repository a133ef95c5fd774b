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


def test_report_top_and_diff_show_churn_with_advice(apps: Any, tcp_server: Any, tmp_path: Any) -> None:
    from .conftest import connwatch_cli, site_row, validate

    churny = apps("churn", tcp_server.port, folder=tmp_path / "canary")
    data = churny.wait_for(lambda d: any(r.get("suspected_churn") for r in d["callsites"]))
    validate(data)
    row = site_row(data, "connect_churn")
    assert row["suspected_churn"] is True and row["live"] == 0
    assert row["churn"]["created_per_min"] >= 6 and row["churn"]["median_lifetime_s"] < 10
    assert all(not r.get("suspected_churn") for r in data["callsites"] if r is not row)
    steady = apps("hold", tcp_server.port, "3", folder=tmp_path / "baseline", interval=0)
    assert steady.finish() == 0
    assert not any(r.get("suspected_churn") for r in steady.snapshot()["callsites"])

    report = connwatch_cli("report", str(churny.path))
    assert report.returncode == 0, report.stderr
    out = report.stdout
    assert "suspected churn: 1 call site(s) build a new client per call" in out
    line = next(ln for ln in out.splitlines() if "(connect_churn)" in ln and "socket/client" in ln)
    assert "<< suspected churn" in line
    assert re.search(r"churn: \d+ created/min, median lifetime [\d.]+ms \(\d+ released\): a new connection per "
                     r"call: reuse one client or pool", out), out

    top = connwatch_cli("top", str(tmp_path / "canary"), "--once")
    assert "SUSPECTED CHURN (a new client per call)" in top.stdout and "connect_churn" in top.stdout

    assert churny.finish() == 0
    diff = connwatch_cli("diff", str(tmp_path / "baseline"), str(tmp_path / "canary"), "--json")
    assert diff.returncode == 0, diff.stderr
    import json

    # The client row (a socket caught between socket() and connect() is a role-less row of the line).
    rows = [r for r in json.loads(diff.stdout)["callsites"]
            if r["function"] == "connect_churn" and r["role"] == "client"]
    assert rows and rows[0]["new_churn_processes"] == 1 and rows[0]["old_churn_processes"] == 0
    text = connwatch_cli("diff", str(tmp_path / "baseline"), str(tmp_path / "canary")).stdout
    assert "churn (new): 1 of 1 process(es) build a client per call" in text, text
