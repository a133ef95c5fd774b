"""Every reader refuses bad snapshot files with a clear message naming the file and the reason:
``connwatch report``, ``connwatch top`` (screen and JSON) and ``connwatch diff`` (file and folder
arguments). One bad file in a folder never hides the good ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest

from tests.conftest import clean_env

from .conftest import run, write_app

LEAK_APP = '''\
import socket
srv = socket.create_server(("127.0.0.1", 0))
keep = [socket.create_connection(srv.getsockname()) for _ in range(3)]  # MARK:leak
'''

# name -> (content, what the message must say)
BAD: Dict[str, Tuple[bytes, str]] = {
    "truncated": (b'{"schema": "connwatch.snapshot/1", "pid": 7, "ti', "corrupt or truncated"),
    "empty": (b"", "empty file"),
    "corrupt": (b"\xff\xfe\x00garbage", "corrupt"),
    "newer": (b'{"schema": "connwatch.snapshot/9", "pid": 7}', "newer than this connwatch reads"),
    "foreign": (b'{"hello": "world"}', "not a connwatch snapshot"),
    "badrow": (b'{"schema": "connwatch.snapshot/1", "pid": 7, "time": 1, "fds": {}, "totals": {}, '
               b'"callsites": [{}]}', "bad call site row"),
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connwatch", *args], capture_output=True, text=True,
                          env=clean_env(), timeout=60)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one real snapshot file (3 live sockets)."""
    base = tmp_path_factory.mktemp("good")
    path, _ = write_app(base, LEAK_APP)
    folder = base / "snap"
    proc = run([str(path)], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder))
    assert proc.returncode == 0, proc.stderr
    (f,) = folder.glob("*.json")
    return f


def _bad_folder(tmp_path: Path, good: Path) -> Tuple[Path, Dict[str, str]]:
    folder = tmp_path / "mixed"
    folder.mkdir(mode=0o700)
    shutil.copy(good, folder / good.name)
    expect = {}
    for name, (content, reason) in BAD.items():
        (folder / f"{name}.json").write_bytes(content)
        expect[f"{name}.json"] = reason
    huge = folder / "huge.json"
    from connwatch import _snapshot

    with open(huge, "wb") as f:
        f.truncate(_snapshot.MAX_FILE_BYTES + 1)
    expect["huge.json"] = "too large"
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs.json"
        theirs.write_bytes(good.read_bytes())
        os.chown(theirs, 65534, 65534)
        (folder / "planted.json").symlink_to(theirs)
        expect["planted.json"] = "owned by another user"
    return folder, expect


def test_report_top_and_diff_skip_bad_files_in_a_folder(tmp_path: Path, good: Path) -> None:
    folder, expect = _bad_folder(tmp_path, good)
    pid = json.loads(good.read_text())["pid"]
    rep = cli("report", str(folder))
    top = cli("top", "--once", str(folder))
    top_json = cli("top", "--json", str(folder))
    diff = cli("diff", str(folder), str(folder))
    for name, proc in (("report", rep), ("top", top), ("top --json", top_json), ("diff", diff)):
        assert proc.returncode == 0, (name, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
    assert f"pid {pid}" in rep.stdout
    data = json.loads(top_json.stdout)
    assert [p["pid"] for p in data["processes"]] == [pid]
    skipped = {os.path.basename(d["path"]): d["error"] for d in data["skipped"]}
    for file, reason in expect.items():
        assert reason in skipped.get(file, ""), (file, skipped.get(file))
        for name, text in (("report", rep.stderr), ("top", top.stdout + top.stderr), ("diff", diff.stderr)):
            lines = [ln for ln in text.splitlines() if file in ln]
            assert lines and any(reason in ln for ln in lines), (name, file, reason, text)


@pytest.mark.parametrize("name", [*sorted(BAD), "huge", "missing"])
def test_report_and_diff_refuse_one_bad_file(tmp_path: Path, good: Path, name: str) -> None:
    bad = tmp_path / f"{name}.json"
    if name == "huge":
        from connwatch import _snapshot

        with open(bad, "wb") as f:
            f.truncate(_snapshot.MAX_FILE_BYTES + 1)
        reason = "too large"
    elif name == "missing":
        reason = "no such"
    else:
        content, reason = BAD[name]
        bad.write_bytes(content)
    for args in (("report", str(bad)), ("diff", str(bad), str(good)), ("diff", str(good), str(bad))):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert str(bad) in proc.stderr and reason in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file as another user")
def test_diff_refuses_a_symlink_to_another_users_file(tmp_path: Path, good: Path) -> None:
    theirs = tmp_path / "theirs.json"
    theirs.write_bytes(good.read_bytes())
    os.chown(theirs, 65534, 65534)
    link = tmp_path / "planted.json"
    link.symlink_to(theirs)
    proc = cli("diff", str(link), str(good))
    assert proc.returncode == 2 and "owned by another user" in proc.stderr, proc.stderr
