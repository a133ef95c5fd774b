"""Reading snapshot files for the commands: a path, pid or folder; groups of processes."""

from __future__ import annotations

import glob
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _config
from .._snapshot import Snapshot, SnapshotError, Statistic


def snapshot_dir() -> str:
    """The folder the agent writes to in this environment."""
    raw = os.environ.get(_config.DIR)
    return os.path.abspath(os.path.expanduser(raw)) if raw and raw.strip() else _config.default_dir()


def resolve(target: Optional[str]) -> Tuple[List[str], Optional[str]]:
    """Snapshot files for PATH, PID or DIR (default: this environment's folder).

    Returns (paths, error message or None).
    """
    if target is None:
        target = snapshot_dir()
        if not os.path.isdir(target):
            return [], f"no snapshot folder at {target} (is the agent enabled? set CONNWATCH_DIR or pass a path)"
    if os.path.isdir(target):
        paths = sorted(p for p in glob.glob(os.path.join(target, "*.json")) if not os.path.basename(p).startswith("."))
        if not paths:
            return [], f"no snapshot files in {target}"
        return paths, None
    if target.isdigit() and not os.path.exists(target):
        folder = snapshot_dir()
        paths = sorted(glob.glob(os.path.join(folder, f"*-{int(target)}.json")))
        if not paths:
            return [], f"no snapshot file for pid {target} in {folder}"
        return paths, None
    return [target], None


def load_all(paths: Sequence[str]) -> Tuple[List[Tuple[str, Snapshot]], List[str]]:
    """Load each path; returns (good snapshots, error messages for the bad ones)."""
    good, bad = [], []
    for p in paths:
        try:
            good.append((p, Snapshot.load(p)))
        except SnapshotError as e:
            bad.append(str(e))
    return good, bad


def scan(folder: str) -> Tuple[List[Tuple[str, Snapshot]], List[Tuple[str, str]]]:
    """Every snapshot in ``folder``: (good (path, snapshot), skipped (path, reason)).

    A file that vanished between listing and reading (a process's atomic rename, or a cleanup)
    is neither: it is simply not there any more.
    """
    good: List[Tuple[str, Snapshot]] = []
    skipped: List[Tuple[str, str]] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return good, skipped
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            good.append((path, Snapshot.load(path)))
        except SnapshotError as e:
            if os.path.exists(path):
                msg = str(e)
                skipped.append((path, msg[len(path) + 2:] if msg.startswith(path + ": ") else msg))
        except Exception as e:  # never let one odd file stop the view
            skipped.append((path, f"unreadable ({type(e).__name__}: {e})"))
    return good, skipped



SiteKey = Tuple[str, Optional[str], str, int, str]  # (kind, role, file, line, function)


def site_key(s: Statistic) -> SiteKey:
    site = s.site
    return (s.kind, s.role, site.file if site else "?", site.line if site else 0, site.function if site else "?")


class Group:
    """One side of a diff: the snapshots of a file, or of every process in a folder."""

    def __init__(self, target: str, snaps: List[Tuple[str, Snapshot]], skipped: List[str]) -> None:
        self.target = target
        self.snaps = snaps
        self.skipped = skipped
        self.sites: Dict[SiteKey, List[int]] = {}  # key -> [live, created, gc_released, processes]
        # key -> [processes flagging suspected churn, sum of their created_per_min]
        self.churn: Dict[SiteKey, List[float]] = {}
        for _p, snap in snaps:
            for s in snap.stats:
                key = site_key(s)
                row = self.sites.setdefault(key, [0, 0, 0, 0])
                row[0] += s.live
                row[1] += s.created
                row[2] += s.gc_released
                row[3] += 1
                if s.churn is not None and s.churn.suspected:
                    c = self.churn.setdefault(key, [0, 0.0])
                    c[0] += 1
                    c[1] += s.churn.created_per_min

    @property
    def processes(self) -> int:
        return len(self.snaps)

    def live(self, key: SiteKey) -> float:
        """Live clients of ``key`` per process of the group."""
        row = self.sites.get(key)
        return row[0] / self.processes if row and self.processes else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"target": self.target, "processes": self.processes,
                "pids": [s.pid for _, s in self.snaps], "skipped": self.skipped}


def load_group(target: str) -> Tuple[Optional[Group], Optional[str]]:
    """Load a snapshot file or folder; returns (group, error message)."""
    if not os.path.exists(target):
        return None, f"{target}: no such file or folder"
    paths, error = resolve(target)
    if error:
        return None, error
    good, bad = load_all(paths)
    if not good:
        return None, "; ".join(bad) or f"{target}: no readable snapshot"
    return Group(target, good, bad), None
