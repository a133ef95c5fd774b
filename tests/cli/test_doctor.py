"""``connwatch doctor``: whether the agent will load here, with a fix for each problem."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

from tests.conftest import REPO, clean_env

from .conftest import connwatch_cli


def _doctor(**env: str) -> Dict[str, Any]:
    proc = connwatch_cli("doctor", "--json", **env)
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    assert proc.returncode == (0 if data["ok"] else 1)
    data["by"] = {c["check"]: c for c in data["checks"]}
    return data


def test_doctor_all_good(tmp_path: Path) -> None:
    data = _doctor(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "snaps"))
    assert data["ok"] and data["agent_will_load"], data["checks"]
    assert data["by"]["pth hook"]["status"] == "ok"
    assert data["by"]["start-up"]["status"] == "ok"
    assert data["by"]["snapshot folder"]["status"] == "ok"
    assert os.stat(tmp_path / "snaps").st_mode & 0o777 == 0o700
    assert os.listdir(tmp_path / "snaps") == []  # the probe file and the agent's own file are gone
    proc = connwatch_cli("doctor", CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "snaps"))
    assert proc.returncode == 0 and "the agent will load in this environment" in proc.stdout
    assert "\x1b[" not in proc.stdout


def test_doctor_variable_unset_or_off(tmp_path: Path) -> None:
    for env in ({}, {"CONNWATCH_ENABLED": "nope"}):
        data = _doctor(CONNWATCH_DIR=str(tmp_path), **env)
        check = data["by"]["CONNWATCH_ENABLED"]
        assert not data["ok"] and not data["agent_will_load"]
        assert check["status"] == "problem" and "export CONNWATCH_ENABLED=1" in check["fix"]
    proc = connwatch_cli("doctor", CONNWATCH_DIR=str(tmp_path))
    assert proc.returncode == 1
    assert "PROBLEM CONNWATCH_ENABLED" in proc.stdout and "fix: export CONNWATCH_ENABLED=1" in proc.stdout


def test_doctor_unusable_folder(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    data = _doctor(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(not_a_dir))
    check = data["by"]["snapshot folder"]
    assert check["status"] == "problem" and "is not a folder" in check["message"]
    assert "CONNWATCH_DIR" in check["fix"]
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    check = _doctor(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(link))["by"]["snapshot folder"]
    assert check["status"] == "problem" and "symbolic link" in check["message"]


def test_doctor_exporter_endpoint_and_bad_settings(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    data = _doctor(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path),
                   OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", CONNWATCH_CAP="lots")
    check = data["by"]["exporter endpoint"]
    assert check["status"] == "warn" and f"127.0.0.1:{port}" in check["message"] and "not reachable" in check["message"]
    assert check["fix"]
    assert data["by"]["configuration"]["status"] == "warn" and "CONNWATCH_CAP" in data["by"]["configuration"]["message"]
    assert data["ok"]  # warnings do not keep the agent from loading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        data = _doctor(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path),
                       OTEL_EXPORTER_OTLP_ENDPOINT=f"127.0.0.1:{port}")
    assert data["by"]["exporter endpoint"]["status"] == "ok"


def test_doctor_sitecustomize_that_replaces_socket(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text("import socket\nsocket.socket = socket.socket  # a monkey-patcher\n")
    env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "snaps"))
    env["PYTHONPATH"] = str(site_dir) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-m", "connwatch", "doctor", "--json"], env=env, capture_output=True,
                          text=True, timeout=60)
    check = next(c for c in json.loads(proc.stdout)["checks"] if c["check"] == "sitecustomize")
    assert check["status"] == "warn" and "sitecustomize.py" in check["message"] and check["fix"]


def test_doctor_in_a_venv_without_the_hook(tmp_path: Path) -> None:
    # A new user's mistake: connwatch on PYTHONPATH of a venv it was never installed into.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path / "snaps"))
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([str(python), "-m", "connwatch", "doctor", "--json"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    by = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    assert by["pth hook"]["status"] == "problem" and "pip install" in by["pth hook"]["fix"]
    # connwatch alone on PYTHONPATH needs no third-party package (psutil only where /proc is missing)
    assert by["dependencies"]["status"] == "ok" and "/proc" in by["dependencies"]["message"]
    assert by["start-up"]["status"] == "problem"
