"""Filesystem faults at run time: the snapshot folder removed, made read-only, the disk full
(a file-size limit, and a small tmpfs where this machine lets us mount one). The app's own work
goes on unchanged; the agent warns at most once, never with a traceback; a snapshot file is
never left torn; writes resume when the fault goes away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from tests.conftest import clean_env

from .conftest import last_json, remove_tree, run, totals, write_app

STEP_APP = '''\
import json, os, socket, sys, time
srv = socket.create_server(("127.0.0.1", 0), backlog=512)
ADDR = srv.getsockname()
keep = []
for step in sys.stdin:  # the test drives the app one step at a time
    n = int(step)
    for _ in range(n):
        keep.append(socket.create_connection(ADDR))  # MARK:leak
    own = os.path.join(os.environ["APP_DIR"], "app-output.txt")
    with open(own, "a") as f:  # the app's own file work
        f.write("step %d\\n" % len(keep))
    time.sleep(0.3)  # several periodic snapshot writes
    print(json.dumps({"live": len(keep)}), flush=True)
'''


class App:
    """The step app under the agent, driven through stdin."""

    def __init__(self, tmp_path: Path, folder: Path, **env: str) -> None:
        self.path, self.marks = write_app(tmp_path, STEP_APP)
        self.folder = folder
        self.proc = subprocess.Popen(
            [sys.executable, str(self.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder),
                                     CONNWATCH_SNAPSHOT_INTERVAL="0.05", APP_DIR=str(tmp_path), **env))

    def step(self, n: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.finish()[1]
        return int(json.loads(line)["live"])

    def finish(self) -> tuple:
        _out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err

    def snapshot(self, until: Optional[Callable[[dict], bool]] = None) -> dict:
        """The snapshot file; with ``until``, the first one it holds for (or the last one after
        10 s). A loaded machine may take a while to write the first (its imports)."""
        deadline = time.monotonic() + 10
        while True:
            found = list(self.folder.glob("*.json"))
            data = json.loads(found[0].read_text()) if len(found) == 1 else None
            if (data is not None and (until is None or until(data))) or time.monotonic() > deadline:
                assert len(found) == 1, f"one snapshot file expected: {found}"
                return data  # type: ignore[return-value]
            time.sleep(0.02)

    def leaks(self, live: int) -> Callable[[dict], bool]:
        """``until`` for :meth:`snapshot`: the leak line's (live, created, closed) is (live, live, 0)."""
        return lambda data: totals(data, self.path, self.marks["leak"]) == (live, live, 0)


def _check_quiet(err: str, warnings: int = 1) -> None:
    assert "Traceback" not in err, err
    assert err.count("connwatch:") <= warnings, err


def test_folder_removed_at_run_time_is_made_again(tmp_path: Path) -> None:
    folder = tmp_path / "snap"
    app = App(tmp_path, folder)
    try:
        assert app.step(3) == 3
        assert app.snapshot(app.leaks(3))["totals"]["live"] >= 3
        remove_tree(folder)
        assert app.step(2) == 5  # the app goes on
        assert totals(app.snapshot(app.leaks(5)), app.path, app.marks["leak"]) == (5, 5, 0)
        assert folder.is_dir(), "the agent makes its folder again"
        assert folder.stat().st_mode & 0o777 == 0o700
    finally:
        code, err = app.finish()
    assert code == 0
    assert err == "", err


FSIZE_APP = '''\
import glob, json, os, resource, signal, socket, sys, time
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the app's own choice: EFBIG instead of a signal
import connwatch
srv = socket.create_server(("127.0.0.1", 0), backlog=512)
ADDR = srv.getsockname()
keep = [socket.create_connection(ADDR)]  # MARK:first
deadline = time.monotonic() + 10
while not glob.glob(os.path.join(os.environ["CONNWATCH_DIR"], "*.json")) and time.monotonic() < deadline:
    time.sleep(0.02)  # a small file gets written
time.sleep(0.1)  # and a few more
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
# Many call sites: the snapshot grows past the limit; the app's own small writes still fit.
for i in range(60):
    exec(compile("keep.append(socket.create_connection(ADDR))", "site_%d.py" % i, "exec"))
with open(os.path.join(os.environ["APP_DIR"], "app-output.txt"), "w") as f:
    f.write("x" * 100)
errors = []
try:
    with open(os.path.join(os.environ["APP_DIR"], "too-big.txt"), "w") as f:
        f.write("y" * (limit + 1))
except OSError as e:
    errors.append(e.errno)
time.sleep(1.0)  # the agent tries to write the grown snapshot (every 0.05 s) and fails
print(json.dumps({"live": len(keep), "errors": errors}), flush=True)
'''


def _check_folder_intact(folder: Path) -> List[dict]:
    leftovers = [p.name for p in folder.iterdir() if not p.name.endswith(".json")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    return [json.loads(p.read_text()) for p in folder.glob("*.json")]


def test_file_size_limit_makes_writes_fail_quietly(tmp_path: Path) -> None:
    import errno

    path, marks = write_app(tmp_path, FSIZE_APP)
    folder = tmp_path / "snap"
    proc = run([str(path), "4096"], CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder),
               CONNWATCH_SNAPSHOT_INTERVAL="0.05", APP_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out == {"live": 61, "errors": [errno.EFBIG]}, "the app's own writes behave as without the agent"
    _check_quiet(proc.stderr)
    assert "cannot write the snapshot file" in proc.stderr  # the one warning
    (data,) = _check_folder_intact(folder)
    # the last file that fit is whole (and predates the growth)
    assert totals(data, path, marks["first"]) == (1, 1, 0)
    assert data["totals"]["live"] < 61


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test (skips where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_on_a_small_tmpfs(tmp_path: Path, small_tmpfs: Path) -> None:
    folder = small_tmpfs / "snap"
    app = App(tmp_path, folder)
    try:
        assert app.step(2) == 2
        good = app.snapshot(app.leaks(2))
        # Fill the disk: the agent's next writes fail (ENOSPC) and must leave no partial file.
        filler = small_tmpfs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        assert app.step(3) == 5  # the app goes on
        now = _check_folder_intact(folder)
        assert len(now) == 1 and now[0]["totals"]["live"] <= 5
        assert totals(now[0], app.path, app.marks["leak"])[0] in (2, 5)  # whole, old or new
        filler.unlink()  # space again: the writes resume
        assert app.step(1) == 6
        assert totals(app.snapshot(app.leaks(6)), app.path, app.marks["leak"]) == (6, 6, 0)
        assert good["pid"] == app.snapshot()["pid"]
    finally:
        code, err = app.finish()
    assert code == 0
    _check_quiet(err)


def test_folder_remounted_read_only_at_run_time(tmp_path: Path, small_tmpfs: Path) -> None:
    folder = small_tmpfs / "snap"
    app = App(tmp_path, folder)
    ro = False
    try:
        assert app.step(2) == 2
        app.snapshot(app.leaks(2))  # written before the remount
        r = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        ro = True
        before = app.snapshot()
        assert app.step(3) == 5
        assert app.snapshot() == before
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
        ro = False
        assert app.step(1) == 6
        assert totals(app.snapshot(app.leaks(6)), app.path, app.marks["leak"]) == (6, 6, 0)
    finally:
        if ro:
            subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], capture_output=True)
        code, err = app.finish()
    assert code == 0
    _check_quiet(err)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_folder_taken_over_by_another_user_at_run_time_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "snap"
    app = App(tmp_path, folder)
    try:
        assert app.step(2) == 2
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        theirs.chmod(0o777)
        os.chown(theirs, 65534, 65534)  # someone else's, writable by all
        deadline = time.monotonic() + 10
        while True:  # the agent makes its folder again as soon as it is gone: swap it in at once
            remove_tree(folder)
            try:
                os.rename(theirs, folder)  # fails if the agent got there first
                break
            except OSError:
                assert time.monotonic() < deadline, "could not put the other user's folder in place"
        assert app.step(1) == 3
        assert list(folder.iterdir()) == [], "our snapshot never lands in a folder another user controls"
    finally:
        code, err = app.finish()
    assert code == 0
    _check_quiet(err)
    assert "owned by another user" in err
