"""Configuration: kwargs > environment > defaults; every bad value warns once and falls back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict

import pytest

from connwatch import _config, _log
from tests.conftest import run_py

APP = "import socket\nKEEP = [socket.socket() for _ in range(3)]\nprint('app ok')\n"


@pytest.fixture(autouse=True)
def _fresh_log() -> Any:
    _log.reset()
    yield
    _log.reset()


def load(env: Dict[str, str], **kw: object) -> _config.Config:
    return _config.load(env, kw)


def test_defaults() -> None:
    c = load({})
    assert c.snapshot_interval == 10.0 and c.exporters == () and c.cap is None
    assert c.cap_mode == "warn" and c.traceback_depth == 16 and c.span_events is True
    assert c.dir.endswith("connwatch") or "connwatch-" in c.dir


def test_environment_and_kwargs_precedence() -> None:
    env = {"CONNWATCH_CAP": "50", "CONNWATCH_CAP_MODE": "RAISE", "CONNWATCH_SNAPSHOT_INTERVAL": "2.5",
           "CONNWATCH_DISABLED_PATCHES": "grpc, urllib3", "CONNWATCH_APP_PATHS": "*/myapp/*",
           "OTEL_SERVICE_NAME": "api"}
    c = load(env)
    assert (c.cap, c.cap_mode, c.snapshot_interval) == (50, "raise", 2.5)
    assert c.disabled_patches == ("grpc", "urllib3") and c.app_paths == ("*/myapp/*",)
    assert c.service == "api"
    c = load(env, cap=7, cap_mode="warn")
    assert (c.cap, c.cap_mode) == (7, "warn")


def test_otlp_is_the_default_exporter_when_an_endpoint_is_set() -> None:
    assert load({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}).exporters == ("otlp",)
    assert load({"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "CONNWATCH_EXPORTER": "none"}).exporters == ()
    assert load({"CONNWATCH_EXPORTER": "prometheus,console"}).exporters == ("prometheus", "console")


@pytest.mark.parametrize("var,raw,field,default", [
    ("CONNWATCH_SNAPSHOT_INTERVAL", "abc", "snapshot_interval", 10.0),
    ("CONNWATCH_SNAPSHOT_INTERVAL", "-1", "snapshot_interval", 10.0),
    ("CONNWATCH_SNAPSHOT_INTERVAL", "nan", "snapshot_interval", 10.0),
    ("CONNWATCH_SNAPSHOT_INTERVAL", "1e400", "snapshot_interval", 10.0),
    ("CONNWATCH_CAP", "-5", "cap", None),
    ("CONNWATCH_CAP", "12.5", "cap", None),
    ("CONNWATCH_CAP", "ten", "cap", None),
    ("CONNWATCH_CAP", "٣", "cap", 3),  # a unicode digit is a valid integer to Python
    ("CONNWATCH_CAP_PER_CALLSITE", "9" * 400, "cap_per_callsite", None),
    ("CONNWATCH_CAP_MODE", "rasie", "cap_mode", "warn"),
    ("CONNWATCH_EXPORTER", "otlpp", "exporters", ()),
    ("CONNWATCH_TRACEBACK_DEPTH", "100000", "traceback_depth", 16),
    ("CONNWATCH_TRACEBACK_DEPTH", "0", "traceback_depth", 16),
    ("CONNWATCH_SPAN_EVENTS", "maybe", "span_events", True),
])
def test_bad_values_warn_once_and_fall_back(var: str, raw: str, field: str, default: object,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="connwatch"):
        c1 = load({var: raw})
        c2 = load({var: raw})
    assert getattr(c1, field) == getattr(c2, field) == default
    warned = [r.getMessage() for r in caplog.records]
    if default == 3:  # valid after all
        assert warned == []
    else:
        assert len(warned) == 1 and var in warned[0], warned


def test_bad_keyword_values_warn_and_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="connwatch"):
        c = load({}, cap=True, snapshot_interval="soon", no_such_setting=1)
    assert c.cap is None and c.snapshot_interval == 10.0
    assert len(caplog.records) == 3


def test_invalid_interval_in_a_real_app_warns_once_and_the_app_runs(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    out = tmp_path / "snap"
    proc = run_py([str(tmp_path / "app.py")], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(out),
                  CONNWATCH_SNAPSHOT_INTERVAL="abc", CONNWATCH_CAP="-1")
    assert proc.returncode == 0 and proc.stdout == "app ok\n"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert "CONNWATCH_SNAPSHOT_INTERVAL" in lines[0] and "CONNWATCH_CAP" in lines[1]
    (snap,) = out.glob("*.json")
    assert json.loads(snap.read_text())["totals"]["live"] == 3


def test_unusable_dir_warns_and_falls_back_to_the_default(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    proc = run_py([str(tmp_path / "app.py")], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(blocker / "sub"),
                  XDG_RUNTIME_DIR=str(runtime))
    assert proc.returncode == 0 and proc.stdout == "app ok\n"
    assert proc.stderr.count("connwatch:") == 1 and "not usable" in proc.stderr
    (snap,) = (runtime / "connwatch").glob("*.json")
    assert json.loads(snap.read_text())["totals"]["live"] == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    proc = run_py([str(tmp_path / "app.py")], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(theirs),
                  XDG_RUNTIME_DIR=str(runtime))
    assert proc.returncode == 0 and proc.stdout == "app ok\n"
    assert "owned by another user" in proc.stderr
    assert list(theirs.iterdir()) == []
    assert len(list((runtime / "connwatch").glob("*.json"))) == 1
