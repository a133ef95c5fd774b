"""Shared fixtures: the agent (enabled per test, reset after), real loopback servers in their
own processes, and a runner for subprocesses that use this checkout's code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

pytest_plugins = ["pytester"]  # the pytest plugin's tests (tests/cli) run pytest on files

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
SCHEMA = TESTS / "data" / "snapshot.schema.json"


# Not agent settings but which implementation runs (scripts/test.sh runs tests/core and tests/reliability
# again with CONNWATCH_PURE_PYTHON=1): kept in subprocesses and through the `agent` fixture.
IMPLEMENTATION_VARS = ("CONNWATCH_PURE_PYTHON",)


def clean_env(**extra: str) -> Dict[str, str]:
    """The environment for a subprocess: no CONNWATCH_*/OTEL_* from outside (but
    :data:`IMPLEMENTATION_VARS`), this checkout first on PYTHONPATH (the installed .pth then loads
    this code), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k in IMPLEMENTATION_VARS or not k.startswith(("CONNWATCH_", "OTEL_", "PYTEST_"))}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_py(args: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 60,
           cwd: Optional[str] = None, **extra: str) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with :func:`clean_env`; returns the completed process (text)."""
    return subprocess.run([sys.executable, *args], env=env or clean_env(**extra), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


class Server:
    """A real server in its own process on loopback."""

    script = TESTS / "servers.py"  # prints its port on its first line, then serves

    def __init__(self, kind: str, host: str = "127.0.0.1", *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(self.script), kind, host, *args],
                                     stdout=subprocess.PIPE, text=True, env=clean_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            self.proc.kill()
            raise RuntimeError(f"{kind} server did not start")
        self.host = host
        self.port = int(line)
        self.address = (host, self.port)
        self.target = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.upstream = self.target

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tcp_server() -> Iterator[Server]:
    """A loopback TCP echo server (its own process)."""
    s = Server("tcp")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def http_server() -> Iterator[Server]:
    """A loopback HTTP/1.1 server (its own process)."""
    s = Server("http")
    yield s
    s.stop()


def drop_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the CONNWATCH_* settings for one test (not IMPLEMENTATION_VARS: the C/Python choice)."""
    for k in list(os.environ):
        if k.startswith("CONNWATCH_") and k not in IMPLEMENTATION_VARS:
            monkeypatch.delenv(k)


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The agent enabled for one test (snapshot folder in tmp_path, no periodic writes)."""
    import connwatch
    from connwatch import _log

    drop_agent_env(monkeypatch)
    _log.reset()
    assert not connwatch.is_enabled(), "a previous test left the agent running"
    assert connwatch.enable(dir=str(tmp_path / "snapshots"), snapshot_interval=0)
    try:
        yield connwatch
    finally:
        connwatch.disable()
        _log.reset()


def live_at(snap: Any, file: str, line: Optional[int] = None, kind: Optional[str] = None,
            role: Optional[str] = "*") -> int:
    """Live count in a snapshot for call sites in ``file`` (and ``line``, ``kind``, ``role``)."""
    total = 0
    for s in snap.statistics("callsite"):
        if s.site is None or os.path.basename(s.site.file) != os.path.basename(file):
            continue
        if line is not None and s.site.line != line:
            continue
        if kind is not None and s.kind != kind:
            continue
        if role != "*" and s.role != role:
            continue
        total += s.live
    return total
