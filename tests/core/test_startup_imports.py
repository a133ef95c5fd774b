"""Starting the agent imports only what it needs: no typing, dataclasses, json, socket."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_py

HEAVY = ("typing", "dataclasses", "json", "socket", "inspect", "tempfile", "importlib.abc", "wrapt",
         "connwatch._snapshot", "connwatch._leaks", "connwatch._guard")


def test_agent_start_imports_nothing_heavy(tmp_path: Path) -> None:
    # -I would drop PYTHONPATH; instead print what is loaded before any app code runs.
    code = "import sys, json; print(json.dumps(sorted(sys.modules)))"
    base = run_py(["-c", code])
    on = run_py(["-c", code], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(tmp_path))
    assert base.returncode == on.returncode == 0, on.stderr
    before = set(json.loads(base.stdout)) - {"json", "json.decoder", "json.scanner", "json.encoder", "_json"}
    added = set(json.loads(on.stdout)) - set(json.loads(base.stdout))
    assert "connwatch.bootstrap" in added
    heavy = sorted(m for m in HEAVY if m in added and m not in before)
    assert heavy == [], f"agent start-up imported {heavy}"
