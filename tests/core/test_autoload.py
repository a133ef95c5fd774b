"""The auto-load path in real subprocesses: .pth hook, `connwatch run`, sitecustomize."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

from tests.conftest import REPO, SCHEMA, clean_env, run_py

LEAKY = '''\
import socket
import sys

def handler(port, keep):
    conn = socket.create_connection(("127.0.0.1", port))  # LEAK
    keep.append(conn)

KEEP = []  # module level: still alive when the final snapshot is written at exit

def main():
    srv = socket.create_server(("127.0.0.1", 0))
    for _ in range(7):
        handler(srv.getsockname()[1], KEEP)
    print("done", len(KEEP))

main()
'''
LEAK_LINE = 5


def only_file(folder: Path) -> Dict[str, Any]:
    files = [p for p in folder.iterdir() if p.suffix == ".json"]
    assert len(files) == 1, files
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    return json.loads(files[0].read_text())


def validate(data: Dict[str, Any]) -> None:
    jsonschema = __import__("jsonschema")
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))


def leak_row(data: Dict[str, Any], script: Path) -> Dict[str, Any]:
    rows = [r for r in data["callsites"] if r["file"] == str(script) and r["line"] == LEAK_LINE]
    assert len(rows) == 1, data["callsites"]
    return rows[0]


def test_unmodified_script_with_env_var_names_the_leaking_line(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(LEAKY)
    out = tmp_path / "snap"
    proc = run_py([str(script)], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done 7"
    assert proc.stderr == ""
    data = only_file(out)
    validate(data)
    row = leak_row(data, script)
    assert (row["kind"], row["role"], row["live"], row["created"]) == ("socket", "client", 7, 7)
    assert row["function"] == "handler"
    assert row["traceback"][0] == {"file": str(script), "line": LEAK_LINE, "function": "handler"}
    assert data["pid"] > 0 and data["final"] is True
    assert data["fds"]["open"] >= 8 and data["fds"]["limit"] > 0
    assert data["totals"]["live"] >= 7


def test_connwatch_run_sets_the_variables(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(LEAKY)
    out = tmp_path / "snap"
    connwatch = Path(sys.executable).with_name("connwatch")
    proc = subprocess.run([str(connwatch), "run", "--dir", str(out), "--interval", "5", "--",
                           sys.executable, str(script)], env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert leak_row(only_file(out), script)["live"] == 7


def test_connwatch_run_without_a_command_is_a_usage_error() -> None:
    proc = run_py(["-m", "connwatch", "run"])
    assert proc.returncode == 2
    assert "give the command" in proc.stderr


def test_sitecustomize_example_loads_the_agent_and_chains_the_existing_one(tmp_path: Path) -> None:
    # A fresh venv without connwatch installed: no .pth hook, so only sitecustomize can load it.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "sitecustomize.py").write_text("import os\nos.environ['CHAINED_SITECUSTOMIZE'] = 'ran'\n")
    script = tmp_path / "app.py"
    script.write_text(LEAKY + "import os, connwatch\nprint(os.environ.get('CHAINED_SITECUSTOMIZE'), "
                               "connwatch.is_enabled())\n")
    out = tmp_path / "snap"
    env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(out))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "sitecustomize_example"), str(existing), str(REPO)])
    proc = subprocess.run([str(venv / "bin" / "python"), str(script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["done 7", "ran True"]
    assert leak_row(only_file(out), script)["live"] == 7
    # without the variable: the chained sitecustomize still runs, the agent does not
    env.pop("CONNWATCH_ENABLED")
    proc = subprocess.run([str(venv / "bin" / "python"), str(script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.splitlines() == ["done 7", "ran False"]


def test_wheel_contains_the_pth_hook(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = tmp_path.glob("connwatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "connwatch.pth" in names, "the hook must sit at the wheel root (site-packages)"
    assert "connwatch/bootstrap.py" in names and "connwatch/py.typed" in names
    line = zipfile.ZipFile(wheel).read("connwatch.pth").decode().strip()
    assert line.startswith("import ") and "\n" not in line


def test_a_process_that_made_no_client_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    proc = run_py(["-c", "import connwatch; print(connwatch.is_enabled())"], CONNWATCH_ENABLED="1",
                  CONNWATCH_DIR=str(out), CONNWATCH_SNAPSHOT_INTERVAL="0.05")
    assert proc.returncode == 0 and proc.stdout == "True\n" and proc.stderr == ""
    assert list(out.glob("*.json")) == []
    proc = run_py(["-c", "import socket, time; s = socket.socket(); time.sleep(0.3)"], CONNWATCH_ENABLED="1",
                  CONNWATCH_DIR=str(out), CONNWATCH_SNAPSHOT_INTERVAL="0.05")
    assert proc.returncode == 0
    assert len(list(out.glob("*.json"))) == 1
