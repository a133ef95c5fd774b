"""Fixtures for the CLI, leak-signal and pytest-plugin tests: real agent processes that write
snapshot files, and a runner for the ``connwatch`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from tests.conftest import REPO, SCHEMA, clean_env, run_py

APP = Path(__file__).resolve().parent / "sockapp.py"


def connwatch_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m connwatch ARGS`` from this checkout (plain output: not a terminal)."""
    return run_py(["-m", "connwatch", *args], timeout=timeout, **env)


class App:
    """A real process running tests/cli/sockapp.py with the agent on, writing snapshots."""

    def __init__(self, folder: Path, mode: str, port: int, *extra: str, interval: float = 0.2,
                 service: Optional[str] = None) -> None:
        env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder),
                        CONNWATCH_SNAPSHOT_INTERVAL=str(interval))
        if service:
            env["CONNWATCH_SERVICE"] = service
        self.proc = subprocess.Popen([sys.executable, str(APP), mode, str(port), *extra], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"sockapp did not start: {line!r}"
        self.pid = self.proc.pid
        self.path = folder / f"{os.uname().nodename}-{self.pid}.json"

    def snapshot(self) -> Dict[str, Any]:
        """The latest snapshot file of this process (retrying over an in-progress first write)."""
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def wait_for(self, pred: Callable[[Dict[str, Any]], bool], timeout: float = 20.0) -> Dict[str, Any]:
        """Poll the snapshot file until ``pred(data)`` holds; returns the data."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.path.exists():
                last = self.snapshot()
                if pred(last):
                    return last
            time.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout}s; last snapshot: {json.dumps(last)[:2000]}")

    def finish(self) -> int:
        """Ask the app to exit normally (it writes its final snapshot); returns the exit code."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[Callable[..., App]]:
    """Start sockapp processes in ``tmp_path/snaps``; all are killed at the end of the test."""
    started: List[App] = []
    folder = tmp_path / "snaps"

    def start(mode: str, port: int, *extra: str, folder: Path = folder, **kw: Any) -> App:
        app = App(folder, mode, port, *extra, **kw)
        started.append(app)
        return app

    yield start
    for app in started:
        app.kill()


def validate(data: Any) -> None:
    """Check a snapshot object against the contract's JSON Schema."""
    import jsonschema

    with open(SCHEMA, encoding="utf-8") as f:
        jsonschema.validate(data, json.load(f))


def site_row(data: Dict[str, Any], function: str, kind: str = "socket",
             role: Optional[str] = "client") -> Dict[str, Any]:
    """The call-site row of ``data`` made in sockapp's ``function``."""
    for row in data["callsites"]:
        if row["function"] == function and row["kind"] == kind and row.get("role") == role \
                and row["file"].endswith("sockapp.py"):
            return row
    raise AssertionError(f"no {kind}/{role} row for {function} in {[r['function'] for r in data['callsites']]}")


__all__ = ["REPO", "App", "connwatch_cli", "site_row", "validate"]
