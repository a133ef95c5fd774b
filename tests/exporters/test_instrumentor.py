"""``opentelemetry-instrument python app.py`` loads connwatch through its entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env

from .conftest import write_app

APP = """
import json, socket, connwatch
s = socket.socket()  # MARK:sock
snap = connwatch.snapshot()
print(json.dumps({"enabled": connwatch.is_enabled(),
                  "lines": [st.site.line for st in snap.statistics("callsite") if st.site]}))
"""


def test_opentelemetry_instrument_loads_connwatch(tmp_path: Path) -> None:
    import json

    path, marks = write_app(tmp_path, APP)
    cli = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
    assert os.path.exists(cli), "opentelemetry-instrument comes with the test extra"
    env = clean_env(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
                    CONNWATCH_SNAPSHOT_INTERVAL="0", CONNWATCH_DIR=str(tmp_path / "s"))
    env.pop("CONNWATCH_ENABLED", None)
    proc = subprocess.run([cli, sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["enabled"] is True, proc.stderr
    assert marks["sock"] in out["lines"]


def test_instrumentor_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNWATCH_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("CONNWATCH_SNAPSHOT_INTERVAL", "0")
    from connwatch import bootstrap
    from connwatch.exporters.instrumentor import ConnwatchInstrumentor

    inst = ConnwatchInstrumentor()
    assert not bootstrap.is_enabled()
    try:
        inst.instrument()
        assert bootstrap.is_enabled()
    finally:
        inst.uninstrument()
    assert not bootstrap.is_enabled()
