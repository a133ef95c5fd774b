"""Helpers for the reliability tests: apps written to a file with marked lines, snapshot files
read back per process."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from tests.conftest import clean_env

_MARK = re.compile(r"#\s*MARK:(\w+)")


def write_app(folder: Path, source: str, name: str = "app.py") -> Tuple[Path, Dict[str, int]]:
    """Write ``source`` to ``folder/name``; returns the path and ``{mark: line}`` for ``# MARK:x``."""
    path = folder / name
    path.write_text(source)
    marks = {}
    for i, line in enumerate(source.splitlines(), 1):
        m = _MARK.search(line)
        if m:
            marks[m.group(1)] = i
    return path, marks


def run(args: List[str], timeout: float = 90, cwd: Optional[Path] = None, **env: str) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with this checkout first on the path and ``env`` added."""
    return subprocess.run([sys.executable, *args], env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd) if cwd else None)


def snapshot_files(folder: Path) -> Dict[int, Dict[str, Any]]:
    """``{pid: data}`` of every snapshot file in ``folder`` (checking each file names its own pid)."""
    out: Dict[int, Dict[str, Any]] = {}
    for p in sorted(folder.glob("*.json")):
        data = json.loads(p.read_text())
        assert p.name.endswith(f"-{data['pid']}.json"), f"{p.name} holds pid {data['pid']}"
        assert data["pid"] not in out, f"two files for pid {data['pid']}"
        out[data["pid"]] = data
    return out


def rows(data: Dict[str, Any], path: Path, line: int, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """The call-site rows of ``data`` at ``path:line`` (and ``kind``)."""
    return [r for r in data["callsites"]
            if os.path.basename(r["file"]) == path.name and r["line"] == line and (kind is None or r["kind"] == kind)]


def totals(data: Dict[str, Any], path: Path, line: int, kind: Optional[str] = None) -> Tuple[int, int, int]:
    """(live, created, closed) summed over the rows at ``path:line``."""
    rs = rows(data, path, line, kind)
    return sum(r["live"] for r in rs), sum(r["created"] for r in rs), sum(r["closed"] for r in rs)


def last_json(stdout: str) -> Any:
    """The last line of ``stdout`` that parses as JSON."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise AssertionError(f"no JSON line in {stdout!r}")


def remove_tree(folder: Path, timeout: float = 10.0) -> None:
    """``rm -rf folder`` while an agent may be writing into it: an entry that vanishes under us
    (the agent's temp file renamed) is fine, and a file written between the listing and the
    ``rmdir`` means another pass. Returns once one pass removed the folder."""

    def gone(func: Any, path: str, exc_info: Any) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    deadline = time.monotonic() + timeout
    while True:
        try:
            shutil.rmtree(folder, onerror=gone)
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY or time.monotonic() > deadline:
                raise
