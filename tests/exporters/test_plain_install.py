"""The headline promise: ``pip install connwatch`` and the environment variables alone deliver
metrics over OTLP (gRPC and HTTP/protobuf), in a venv that has nothing but connwatch and its
dependencies (no test extras, no ``connwatch[otlp]``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from tests.conftest import REPO

from .otlp_receiver import GrpcReceiver, HttpReceiver

APP = """
import os, socket, sys
host, port = "127.0.0.1", int(os.environ["TARGET_PORT"])
keep = []
def hold():
    for _ in range(4):
        keep.append(socket.create_connection((host, port)))  # the line exported
hold()
print("pid", os.getpid(), flush=True)
sys.stdin.readline()  # held until the test has seen the export (no code of connwatch's here)
"""
APP_LINE = 6


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with only ``pip install <checkout>`` (what a user types)."""
    folder = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    py = folder / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield py


def _plain_env(**extra: str) -> Dict[str, str]:
    # Nothing of this checkout or of the test venv: only the plain venv's own site-packages.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONNWATCH_", "OTEL_", "PYTEST_", "VIRTUAL_ENV")) and k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_the_plain_install_has_no_test_extras(plain_venv: Path) -> None:
    code = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
            "('connwatch', 'opentelemetry.sdk.metrics', 'opentelemetry.exporter.otlp.proto.grpc.metric_exporter', "
            "'opentelemetry.exporter.otlp.proto.http.metric_exporter', 'pytest', 'jsonschema', 'requests')}))")
    proc = subprocess.run([str(plain_venv), "-c", code], env=_plain_env(), capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    import json

    found = json.loads(proc.stdout)
    assert found["connwatch"] and found["opentelemetry.sdk.metrics"]
    assert found["opentelemetry.exporter.otlp.proto.grpc.metric_exporter"]
    assert found["opentelemetry.exporter.otlp.proto.http.metric_exporter"]
    assert not found["pytest"] and not found["jsonschema"], "the venv must hold no test extras"


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_env_vars_alone_export_over_otlp(plain_venv: Path, tmp_path: Path, tcp_server: Any, protocol: str) -> None:
    receiver: Any = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    try:
        base = receiver.endpoint if protocol == "grpc" else receiver.endpoint.rsplit("/v1/metrics", 1)[0]
        app = tmp_path / "app.py"
        app.write_text(APP.lstrip("\n"))
        env = _plain_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "snaps"),
                         OTEL_EXPORTER_OTLP_ENDPOINT=base, OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
                         OTEL_SERVICE_NAME="plain-svc", OTEL_METRIC_EXPORT_INTERVAL="200",
                         TARGET_PORT=str(tcp_server.port))
        proc = subprocess.Popen([str(plain_venv), str(app)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
        try:
            assert proc.stdout is not None
            pid = int(proc.stdout.readline().split()[1])

            def match(p: Any) -> bool:
                return (p[0].get("process.pid") == pid and p[1].get("code.line.number") == APP_LINE
                        and p[1].get("code.file.path") == str(app) and p[2] == 4)

            pts = receiver.wait_for("connwatch.clients.live", match, timeout=60)
        finally:
            _out, err = proc.communicate("\n", timeout=60)
        assert proc.returncode == 0, err
        assert "needs the OpenTelemetry SDK" not in err
        assert pts, f"no live=4 point over {protocol}: {receiver.points('connwatch.clients.live')[:5]}"
        assert pts[-1][0]["service.name"] == "plain-svc"
        assert pts[-1][1]["code.function.name"] == "hold"
    finally:
        receiver.stop()
