"""Retainers outside the API: a real leaking process with CONNWATCH_RETAINERS writes them for
its suspected leak (and not without the setting), ``connwatch report`` prints them, and the
pytest plugin's failure names the dict that holds the leaked socket."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.cli.conftest import APP, connwatch_cli, site_row, validate
from tests.conftest import REPO, Server, clean_env


class Leaker:
    """sockapp.py in ``leak`` mode: a new loopback connection every 0.1 s, kept in ``held``."""

    def __init__(self, folder: Path, port: int, *, run: Optional[List[str]] = None, **env: str) -> None:
        """With ``run``, started as ``connwatch run RUN -- python sockapp.py leak PORT`` (it execs)."""
        app = [sys.executable, str(APP), "leak", str(port)]
        if run is None:
            full = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder), CONNWATCH_SNAPSHOT_INTERVAL="0.2", **env)
            cmd = app
        else:
            full = clean_env(**env)
            cmd = [sys.executable, "-m", "connwatch", "run", "--dir", str(folder), "--interval", "0.2", *run,
                   "--", *app]
        self.proc = subprocess.Popen(cmd, env=full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.path = folder / f"{os.uname().nodename}-{self.proc.pid}.json"

    def wait_for_suspect(self, timeout: float = 30.0) -> Dict[str, Any]:
        """The first snapshot whose connect_leaky row is a suspected leak."""
        deadline = time.monotonic() + timeout
        last: Optional[Dict[str, Any]] = None
        while time.monotonic() < deadline:
            try:
                last = json.loads(self.path.read_text())
            except (OSError, ValueError):
                last = None
            if last is not None:
                for row in last["callsites"]:
                    if row["function"] == "connect_leaky" and row.get("role") == "client" \
                            and row.get("suspected_leak"):
                        return last
            time.sleep(0.05)
        raise AssertionError(f"no suspected leak within {timeout}s: {json.dumps(last)[:2000]}")

    def finish(self) -> int:
        """Ask the app to exit normally (it writes its final snapshot); returns the exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)


@pytest.fixture
def leakers(tmp_path: Path) -> Iterator[Any]:
    started = []

    def start(folder: Path, port: int, **kw: Any) -> Leaker:
        app = Leaker(folder, port, **kw)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def _leaky_row(data: Dict[str, Any]) -> Dict[str, Any]:
    # The client row: a socket between socket() and connect() has no role yet and may show as a
    # second, transient row of the same line in a periodic snapshot.
    return site_row(data, "connect_leaky")


def test_setting_adds_retainers_of_suspected_leaks_and_report_prints_them(
        leakers: Any, tcp_server: Server, tmp_path: Path) -> None:
    app = leakers(tmp_path / "on", tcp_server.port, CONNWATCH_RETAINERS="1")
    data = app.wait_for_suspect()
    validate(data)
    row = _leaky_row(data)
    assert row["retainers"], row
    assert all(re.fullmatch(r"__main__\.held \(list\) \[\d+\]", p) for p in row["retainers"]), row["retainers"]
    search = data["retainers_search"]
    assert search["found"] >= 1 and search["truncated"] is False, search
    # Only suspected sites are searched.
    assert all("retainers" not in r for r in data["callsites"] if not r.get("suspected_leak"))
    # `connwatch report` on that file prints the path under the call site.
    out = connwatch_cli("report", str(app.path))
    assert out.returncode == 0, out.stderr
    assert re.search(r"held by: __main__\.held \(list\) \[\d+\]", out.stdout), out.stdout
    assert re.search(r"retainers: searched [\d,]+ objects in \d+ ms", out.stdout), out.stdout
    # The final snapshot at exit has them too.
    assert app.finish() == 0
    final = json.loads(app.path.read_text())
    assert final["final"] is True and _leaky_row(final).get("retainers"), _leaky_row(final)


def test_connwatch_run_retainers_flag(leakers: Any, tcp_server: Server, tmp_path: Path) -> None:
    app = leakers(tmp_path / "run", tcp_server.port, run=["--retainers"])
    row = _leaky_row(app.wait_for_suspect())
    assert row["retainers"] and all(p.startswith("__main__.held (list) [") for p in row["retainers"]), row


def test_without_the_setting_no_retainers_are_written(leakers: Any, tcp_server: Server, tmp_path: Path) -> None:
    app = leakers(tmp_path / "off", tcp_server.port)
    data = app.wait_for_suspect()
    validate(data)
    assert "retainers" not in _leaky_row(data) and "retainers_search" not in data
    out = connwatch_cli("report", str(app.path))
    assert out.returncode == 0 and "held by:" not in out.stdout, out.stdout


PARKED = '''
import socket

PARKED = {}


def test_parks_a_socket():
    PARKED["conn"] = socket.socket()  # PARK-LINE


def test_clean():
    socket.socket().close()
'''


def test_pytest_failure_names_the_retainer(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("CONNWATCH_", "PYTEST_ADDOPTS")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makepyfile(test_parked=textwrap.dedent(PARKED))
    result = pytester.runpytest_subprocess("--connwatch", "-p", "no:cacheprovider", timeout=120)
    out = result.stdout.str()
    assert result.parseoutcomes().get("failed") == 1 and result.parseoutcomes().get("passed") == 1, out
    line = next(i for i, ln in enumerate(PARKED.strip().splitlines(), 1) if "PARK-LINE" in ln)
    assert re.search(rf"\+1 socket at \S*test_parked.py:{line} \(test_parks_a_socket\)", out), out
    assert "    held by: test_parked.PARKED (dict) ['conn']" in out, out
