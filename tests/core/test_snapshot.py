"""Snapshots: statistics, comparison, the JSON file (schema, atomic, 0600), the periodic
writer thread, and `connwatch report` on files written by real runs."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from connwatch import Snapshot, SnapshotError
from tests.conftest import SCHEMA, Server, run_py
from tests.core.test_autoload import LEAK_LINE, LEAKY

F = __file__


def here() -> int:
    return sys._getframe(1).f_lineno


def validate(data: Dict[str, Any]) -> None:
    __import__("jsonschema").validate(data, json.loads(SCHEMA.read_text()))


def test_statistics_groupings(agent: Any, tcp_server: Server) -> None:
    clients = [socket.create_connection(tcp_server.address, timeout=5) for _ in range(3)]
    a, b = socket.socketpair()
    snap = agent.snapshot()
    kinds = {s.kind: s.live for s in snap.statistics("kind")}
    assert kinds == {"socket": 5}
    ups = {s.upstream: s.live for s in snap.statistics("upstream")}
    assert ups == {tcp_server.upstream: 3}
    by_site = snap.statistics("callsite")
    assert [s.live for s in by_site] == sorted((s.live for s in by_site), reverse=True)
    with pytest.raises(ValueError):
        snap.statistics("colour")
    for s in (*clients, a, b):
        s.close()


def test_compare_to(agent: Any, tcp_server: Server) -> None:
    line = here() + 2
    def open_one() -> socket.socket:
        return socket.create_connection(tcp_server.address, timeout=5)
    first = [open_one() for _ in range(2)]
    old = agent.snapshot()
    more = [open_one() for _ in range(3)]
    first[0].close()
    new = agent.snapshot()
    (diff,) = [d for d in new.compare_to(old) if d.site and d.site.line == line]
    assert (diff.live, diff.live_diff, diff.created_diff, diff.closed_diff) == (4, 2, 3, 1)
    for s in first[1:] + more:
        s.close()


def test_dump_and_load_round_trip(agent: Any, tmp_path: Path, tcp_server: Server) -> None:
    keep = [socket.create_connection(tcp_server.address, timeout=5) for _ in range(2)]
    snap = agent.snapshot()
    (tmp_path / "dump").mkdir()
    path = tmp_path / "dump" / "out.json"
    snap.dump(str(path))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"], "no temp file left behind"
    data = json.loads(path.read_text())
    validate(data)
    back = Snapshot.load(str(path))
    assert back.live == snap.live == 2
    assert [(s.kind, s.role, s.site, s.live, s.created, s.upstreams) for s in back.statistics()] == \
           [(s.kind, s.role, s.site, s.live, s.created, s.upstreams) for s in snap.statistics()]
    assert back.statistics()[0].site.traceback == snap.statistics()[0].site.traceback
    for s in keep:
        s.close()


@pytest.mark.parametrize("content,reason", [
    (None, "no such snapshot file"),
    ("", "empty file"),
    ('{"schema": "connwatch.snapshot/1", "pid": 1, "ti', "corrupt or truncated"),
    ("[1, 2]", "not a connwatch snapshot"),
    ('{"hello": "world"}', "not a connwatch snapshot"),
    ('{"schema": "connwatch.snapshot/9", "pid": 1}', "newer than this connwatch reads"),
    ('{"schema": "connwatch.snapshot/1", "pid": "x", "time": 1, "fds": {}, "totals": {}, "callsites": []}',
     "bad or missing 'pid'"),
    ('{"schema": "connwatch.snapshot/1", "pid": 1, "time": 1, "fds": {}, "totals": {}, "callsites": [{}]}',
     "bad call site row"),
    ("\xff\xfe garbage", "corrupt"),
])
def test_load_refuses_bad_files_clearly(tmp_path: Path, content: Any, reason: str) -> None:
    path = tmp_path / "snap.json"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    with pytest.raises(SnapshotError, match=reason):
        Snapshot.load(str(path))


def test_periodic_writer_thread(tmp_path: Path, tcp_server: Server) -> None:
    import connwatch

    folder = tmp_path / "snaps"
    assert connwatch.enable(dir=str(folder), snapshot_interval=0.1)
    try:
        assert any(t.name == "connwatch-snapshot" and t.daemon for t in threading.enumerate())
        path = Path(connwatch.snapshot_path() or "")
        assert path.parent == folder and path.name == f"{socket.gethostname()}-{os.getpid()}.json"
        c = socket.create_connection(tcp_server.address, timeout=5)
        deadline = time.monotonic() + 10
        seen = set()
        while time.monotonic() < deadline and len(seen) < 3:
            if path.exists():
                data = json.loads(path.read_text())
                seen.add(data["time"])
            time.sleep(0.05)
        assert len(seen) >= 3, "the file is rewritten periodically"
        assert data["totals"]["live"] >= 1
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        c.close()
    finally:
        connwatch.disable()
    assert not any(t.name == "connwatch-snapshot" for t in threading.enumerate())
    final = json.loads(path.read_text())
    assert final["final"] is True and final["totals"]["live"] == 0


@pytest.fixture
def leaky_run(tmp_path: Path) -> Path:
    script = tmp_path / "app.py"
    script.write_text(LEAKY)
    out = tmp_path / "snap"
    proc = run_py([str(script)], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_report_names_the_leaking_line(leaky_run: Path) -> None:
    proc = run_py(["-m", "connwatch", "report", str(leaky_run)])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"app.py:{LEAK_LINE} (handler)" in out
    assert "socket/client" in out and "traceback (most recent call last)" in out
    assert "fds: " in out and " open of " in out
    first_row = next(line for line in out.splitlines() if "socket/" in line)
    assert first_row.split()[0] == "7", "sorted by live count, the leak first"


def test_report_json_top_and_pid(leaky_run: Path) -> None:
    (path,) = leaky_run.glob("*.json")
    proc = run_py(["-m", "connwatch", "report", str(path), "--json"])
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == json.loads(path.read_text())
    proc = run_py(["-m", "connwatch", "report", str(path), "--top", "1"])
    assert "more call sites" in proc.stdout
    pid = json.loads(path.read_text())["pid"]
    proc = run_py(["-m", "connwatch", "report", str(pid)], CONNWATCH_DIR=str(leaky_run))
    assert proc.returncode == 0 and f"pid {pid}" in proc.stdout


def test_report_missing_and_corrupt_files(tmp_path: Path, leaky_run: Path) -> None:
    proc = run_py(["-m", "connwatch", "report", str(tmp_path / "nope.json")])
    assert proc.returncode == 2 and "no such snapshot file" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "connwatch.snapshot/1", "pid": 3, "tim')
    proc = run_py(["-m", "connwatch", "report", str(bad)])
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr
    (leaky_run / "zz-bad.json").write_text("{")
    proc = run_py(["-m", "connwatch", "report", str(leaky_run)])
    assert proc.returncode == 0 and "skipped" in proc.stderr and "handler" in proc.stdout
    proc = run_py(["-m", "connwatch", "report", "999999999"], CONNWATCH_DIR=str(leaky_run))
    assert proc.returncode == 2 and "no snapshot file for pid" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file as another user")
def test_symlink_to_another_users_file_is_refused(tmp_path: Path, leaky_run: Path) -> None:
    (good,) = leaky_run.glob("*.json")
    theirs = tmp_path / "theirs.json"
    theirs.write_text(good.read_text())
    os.chown(theirs, 65534, 65534)
    link = leaky_run / "planted.json"
    link.symlink_to(theirs)
    with pytest.raises(SnapshotError, match="owned by another user"):
        Snapshot.load(str(link))
    proc = run_py(["-m", "connwatch", "report", str(link)])
    assert proc.returncode == 2 and "owned by another user" in proc.stderr
    own_link = leaky_run / "mine.json"
    own_link.symlink_to(good)
    assert Snapshot.load(str(own_link)).pid == Snapshot.load(str(good)).pid


def test_huge_file_is_refused(tmp_path: Path) -> None:
    from connwatch import _snapshot

    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(_snapshot.MAX_FILE_BYTES + 1)
    with pytest.raises(SnapshotError, match="too large"):
        Snapshot.load(str(big))


def test_read_json_without_tracebacks_drops_only_the_tracebacks(tmp_path: Any) -> None:
    from connwatch import _snapshot
    from connwatch._callsite import CallSite

    odd = ['/srv/a "quoted" \\\\ path].py', "/srv/ünïcode/{braces}.py", '/srv/"traceback":[x].py']
    stats = tuple(
        _snapshot.Statistic("socket", "client", CallSite(f, 10 + i, f"f{i}", False,
                                                          tuple((f, 10 + i + j, f"g{j}]}}") for j in range(3))),
                            live=i + 1, created=i + 2, closed=1, upstreams=(("h:1", i + 1),))
        for i, f in enumerate(odd))
    snap = _snapshot.Snapshot(stats, 1.0, 42, "host", "svc", fds_open=5, fds_limit=100)
    path = tmp_path / "s.json"
    snap.dump(str(path))
    full = _snapshot.read_json(str(path))
    lean = _snapshot.read_json(str(path), tracebacks=False)
    assert all(len(r["traceback"]) == 3 for r in full["callsites"])
    assert all(r["traceback"] == [] for r in lean["callsites"])
    for r in full["callsites"]:
        r["traceback"] = []
    assert lean == full
    # Names made of JSON's own punctuation: the quick cut may land inside a string; the result
    # is still the file less its tracebacks.
    import random

    rng = random.Random(11)
    chars = ['"', "\\", "]", "}", "[", "{", ",", ":", "a", " ", "}]", '"}]', "\n"]
    for _ in range(40):
        names = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 8))) for _ in range(4)]
        stats = tuple(
            _snapshot.Statistic("socket", "client", CallSite(f"/s/{n}.py", i + 1, n, False,
                                                              ((f"/s/{n}.py", i + 1, n), ("/m.py", 1, names[0]))),
                                live=i, created=i + 1, closed=1)
            for i, n in enumerate(names))
        _snapshot.Snapshot(stats, 1.0, 7, "h", None).dump(str(path))
        full = _snapshot.read_json(str(path))
        for r in full["callsites"]:
            r["traceback"] = []
        assert _snapshot.read_json(str(path), tracebacks=False) == full, names
    # A file in another layout (indented, as older versions wrote): parsed whole, then emptied.
    path.write_text(json.dumps(snap.to_dict(), indent=1))
    assert _snapshot.read_json(str(path))["callsites"][0]["traceback"]
    indented = _snapshot.read_json(str(path), tracebacks=False)
    assert all(r["traceback"] == [] for r in indented["callsites"]) and indented == lean
