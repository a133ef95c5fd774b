"""Fixtures for exporter tests: real OTLP receivers, and app scripts run with the agent on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from tests.conftest import clean_env

from .otlp_receiver import GrpcReceiver, HttpReceiver


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.stop()


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver()
    yield r
    r.stop()


def write_app(folder: Path, source: str, name: str = "leaky_app.py") -> Tuple[Path, Dict[str, int]]:
    """Write ``source`` to ``folder/name``; returns its path and {marker: line} for ``# MARK:x``."""
    text = textwrap.dedent(source).lstrip("\n")
    path = folder / name
    path.write_text(text)
    marks = {}
    for i, line in enumerate(text.splitlines(), 1):
        if "# MARK:" in line:
            marks[line.split("# MARK:", 1)[1].strip()] = i
    return path, marks


def run_app(path: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run an app script with the agent on (CONNWATCH_ENABLED=1 through the .pth hook)."""
    e = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_SNAPSHOT_INTERVAL="0",
                  CONNWATCH_DIR=str(path.parent / "snapshots"), **env)
    return subprocess.run([sys.executable, str(path)], env=e, capture_output=True, text=True,
                          timeout=timeout, cwd=str(path.parent))


def last_json(stdout: str) -> Any:
    """The last line of stdout that is a JSON document."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output: {stdout!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_prometheus(prom: str, config: Dict[str, Any], folder: Path) -> Tuple[subprocess.Popen, int]:
    """A real Prometheus (``prom``: its binary) with ``config`` (prometheus.yml as a dict) on a
    free loopback port, its data in ``folder``: (process, port). Stop it with stop_prometheus."""
    port = free_port()
    cfg = folder / "prometheus.yml"
    cfg.write_text(json.dumps(config))
    server = subprocess.Popen([prom, f"--config.file={cfg}", f"--storage.tsdb.path={folder / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return server, port


def stop_prometheus(server: subprocess.Popen) -> str:
    """Stop a Prometheus from start_prometheus (killed after 15 s); returns its log (stderr)."""
    server.terminate()
    try:
        _, err = server.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        _, err = server.communicate()
    return err or ""


# Printed by apps as their last line: the live call sites of the agent's own snapshot.
SITES_SNIPPET = """
import json as _json, connwatch as _cw
print(_json.dumps([[s.kind, s.role, s.site.file if s.site else None, s.site.line if s.site else None, s.live,
                    s.created] for s in _cw.snapshot().statistics("callsite")]), flush=True)
"""


def sites(stdout: str) -> List[List[Any]]:
    return last_json(stdout)  # type: ignore[no-any-return]


def env_without(*names: str) -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
