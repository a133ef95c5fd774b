"""``connwatch diff``: per call site change between snapshot files (or folders) written by
real runs, with thresholds and exit codes a rollout pipeline can gate on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict

from .conftest import connwatch_cli


def _run(apps: Any, folder: Path, port: int, n: int) -> Path:
    """A real run holding ``n`` connections at exit; returns its final snapshot file."""
    app = apps("hold", port, str(n), folder=folder, interval=0)
    assert app.finish() == 0
    assert app.snapshot()["final"] is True
    return app.path


def _row(result: Dict[str, Any], function: str) -> Dict[str, Any]:
    return next(r for r in result["callsites"] if r["function"] == function and r["role"] == "client")


def test_diff_files_thresholds_and_exit_codes(apps: Any, tcp_server: Any, tmp_path: Path) -> None:
    old = _run(apps, tmp_path / "old", tcp_server.port, 2)
    new = _run(apps, tmp_path / "new", tcp_server.port, 12)

    proc = connwatch_cli("diff", str(old), str(new), "--json")
    assert proc.returncode == 0, proc.stderr  # no thresholds: report only
    result = json.loads(proc.stdout)
    row = _row(result, "connect_held")
    assert (row["old_live"], row["new_live"], row["growth"], row["ratio"]) == (2, 12, 10, 6.0)
    assert row["file"].endswith("sockapp.py") and row["exceeded"] == []
    assert result["passed"] is True and result["per_process"] is False

    proc = connwatch_cli("diff", str(old), str(new), "--max-growth", "5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "connect_held" in ln)
    assert "FAIL: growth +10 > 5" in line and "sockapp.py:" in line
    assert "result: FAIL: 1 call site(s) over a threshold (--max-growth 5)" in proc.stdout

    assert connwatch_cli("diff", str(old), str(new), "--max-growth", "10").returncode == 0
    proc = connwatch_cli("diff", str(old), str(new), "--max-ratio", "3", "--json")
    assert proc.returncode == 1 and _row(json.loads(proc.stdout), "connect_held")["exceeded"] == ["ratio 6.00 > 3"]
    assert connwatch_cli("diff", str(old), str(new), "--max-ratio", "6").returncode == 0
    # Shrinking is never a failure.
    assert connwatch_cli("diff", str(new), str(old), "--max-growth", "0", "--max-ratio", "1").returncode == 0
    # Same run on both sides: nothing grew.
    assert connwatch_cli("diff", str(old), str(old), "--max-growth", "0").returncode == 0


def test_diff_folders_compare_per_process(apps: Any, tcp_server: Any, tmp_path: Path) -> None:
    baseline, canary = tmp_path / "baseline", tmp_path / "canary"
    for _ in range(3):
        _run(apps, baseline, tcp_server.port, 2)
    _run(apps, canary, tcp_server.port, 2)
    (canary / "garbage.json").write_text('{"schema": "connwatch.snapshot/1", "pid": ')

    proc = connwatch_cli("diff", str(baseline), str(canary), "--max-growth", "0", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["old"]["processes"] == 3 and result["new"]["processes"] == 1 and result["per_process"]
    assert _row(result, "connect_held")["old_live"] == 2 and _row(result, "connect_held")["growth"] == 0
    assert "garbage.json" in result["new"]["skipped"][0]
    assert "skipped" in proc.stderr and "garbage.json" in proc.stderr

    bad = tmp_path / "canary2"
    _run(apps, bad, tcp_server.port, 9)
    proc = connwatch_cli("diff", str(baseline), str(bad), "--max-growth", "3")
    assert proc.returncode == 1
    assert "(3 processes)" in proc.stdout and "live clients per process" in proc.stdout


def test_diff_unreadable_input_and_usage(apps: Any, tcp_server: Any, tmp_path: Path) -> None:
    good = _run(apps, tmp_path / "good", tcp_server.port, 1)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(good.read_text()[:40])
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"hello": "world"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    for other in (corrupt, foreign, tmp_path / "missing.json", empty):
        proc = connwatch_cli("diff", str(good), str(other))
        assert proc.returncode == 2, (other, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("connwatch: diff: ") and "Traceback" not in proc.stderr
    assert "corrupt or truncated" in connwatch_cli("diff", str(corrupt), str(good)).stderr
    assert connwatch_cli("diff", str(good), str(good), "--max-ratio", "0").returncode == 2
    assert connwatch_cli("diff", str(good)).returncode == 2
    shutil.rmtree(empty)
