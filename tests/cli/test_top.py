"""``connwatch top`` under a real pseudo-terminal, reading the snapshot files of live
processes; corrupt, truncated and foreign files are shown as skipped, never a crash."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any, Optional

from tests.conftest import clean_env

from .conftest import connwatch_cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PtyTop:
    """``python -m connwatch top DIR`` with its stdin/stdout/stderr on a new pseudo-terminal."""

    def __init__(self, folder: Path, *args: str, rows: int = 50, cols: int = 200, **env: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connwatch", "top", str(folder), *args],
            stdin=slave, stdout=slave, stderr=slave, env=clean_env(TERM="xterm", **env),
            start_new_session=True,
        )
        os.close(slave)
        self.raw = b""

    def read(self, timeout: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                return
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            self.raw += chunk

    def screen(self) -> str:
        """The last full frame drawn (text after the last cursor-home), without escapes."""
        text = self.raw.decode("utf-8", "replace")
        last = text.rfind("\x1b[H")
        return ANSI.sub("", text[last:] if last >= 0 else text)

    def wait_screen(self, *needles: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.2)
            if self.proc.poll() is not None:
                raise AssertionError(f"top exited with {self.proc.returncode}: {self.raw[-3000:]!r}")
            screen = self.screen()
            if all(n in screen for n in needles):
                return screen
        raise AssertionError(f"screen never showed {needles}; last screen:\n{self.screen()}")

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def wait_exit(self, timeout: float = 10.0) -> Optional[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.read(0.1)
        self.read(0.2)
        return self.proc.poll()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


def test_top_live_view_under_a_pty(apps: Any, tcp_server: Any, tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    leak = apps("leak", tcp_server.port, service="leaky-svc")
    pool = apps("pool", tcp_server.port, "4", service="pool-svc")
    done = apps("hold", tcp_server.port, "1", service="done-svc")
    assert done.finish() == 0
    # A bad neighbour of each sort in the folder.
    (folder / "truncated.json").write_text(pool.path.read_text()[:50] if pool.path.exists() else '{"schema": ')
    (folder / "foreign.json").write_text('{"kind": "something else"}')
    (folder / "binary.json").write_bytes(b"\x00\xff\xfe garbage")
    leak.wait_for(lambda d: any(r.get("suspected_leak") for r in d["callsites"]))

    top = PtyTop(folder, "--interval", "0.3")
    try:
        screen = top.wait_screen("leaky-svc", "pool-svc", "done-svc", "SUSPECTED LEAKS", "3 files skipped")
        rows = {name: ln for ln in screen.splitlines() for name in ("leaky-svc", "pool-svc", "done-svc")
                if name in ln and ln.strip().startswith(str({"leaky-svc": leak.pid, "pool-svc": pool.pid,
                                                              "done-svc": done.pid}[name]))}
        assert "running" in rows["leaky-svc"] and "connect_leaky" in rows["leaky-svc"]
        assert "exited" in rows["done-svc"]
        assert re.search(r"\d+/\d+", rows["leaky-svc"])  # fds used/limit
        assert f"pid {leak.pid}: " in screen and "(connect_leaky)" in screen
        assert "truncated.json: corrupt or truncated JSON" in screen
        assert "foreign.json: not a connwatch snapshot" in screen
        assert "q quits" in screen
        assert b"\x1b[?1049h" in top.raw  # alternate screen on a terminal

        # The view refreshes: a process that dies is marked gone; a file that turns to garbage
        # while top runs is skipped with a note, and top keeps going.
        pool.kill()
        (folder / "late.json").write_text("[")
        screen = top.wait_screen("gone", "late.json", "4 files skipped")
        assert any("pool-svc" in ln and "gone" in ln for ln in screen.splitlines())

        top.press(b"q")
        assert top.wait_exit() == 0
        assert top.raw.endswith(b"\x1b[?25h\x1b[?1049l") or b"\x1b[?1049l" in top.raw[-64:]
    finally:
        top.close()


def test_top_q_quits_an_empty_or_missing_folder(tmp_path: Path) -> None:
    top = PtyTop(tmp_path / "not-yet", "--interval", "5")
    try:
        top.wait_screen("no snapshot files yet")
        t0 = time.monotonic()
        top.press(b"q")
        assert top.wait_exit() == 0
        assert time.monotonic() - t0 < 3.0  # q is read at once, not at the next refresh
    finally:
        top.close()


def test_top_once_json_and_plain(apps: Any, tcp_server: Any, tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    leak = apps("leak", tcp_server.port)
    leak.wait_for(lambda d: any(r.get("suspected_leak") for r in d["callsites"]))
    (folder / "bad.json").write_text("{not json")

    proc = connwatch_cli("top", str(folder), "--once", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (p,) = data["processes"]
    assert p["pid"] == leak.pid and p["state"] == "running" and p["live"] >= 5
    assert p["suspected_leaks"][0]["function"] == "connect_leaky"
    assert p["fds"]["open"] and p["fds"]["limit"] and p["fd_exhaustion_eta_s"] is not None
    assert data["skipped"][0]["path"].endswith("bad.json")

    proc = connwatch_cli("top", str(folder), "-n", "2", "--interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("connwatch top - ") == 2
    assert "\x1b[" not in proc.stdout and "SUSPECTED LEAKS" in proc.stdout and "bad.json" in proc.stdout
    assert "q quits" not in proc.stdout

    assert connwatch_cli("top", str(tmp_path / "missing"), "--once").returncode == 2
    assert connwatch_cli("top", str(folder), "--interval", "0").returncode == 2


def test_top_survives_only_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.json").write_text("")
    (folder / "b.json").write_text('{"schema": "connwatch.snapshot/9", "pid": 1}')
    (folder / "c.json").write_text('{"schema": "connwatch.snapshot/1", "pid": "x", "time": 1}')
    (folder / "d.json").mkdir()
    proc = connwatch_cli("top", str(folder), "--once")
    assert proc.returncode == 0, proc.stderr
    assert "4 files skipped" in proc.stdout
    assert "a.json: empty file" in proc.stdout and "newer than this connwatch reads" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    shutil.rmtree(folder)


def test_commands_do_not_report_themselves(apps: Any, tcp_server: Any, tmp_path: Path) -> None:
    # With CONNWATCH_ENABLED in the shell, the command's own process must not show up.
    folder = tmp_path / "snaps"
    app = apps("hold", tcp_server.port, "1")
    app.wait_for(lambda d: d["totals"]["live"] >= 1)
    for args in (["top", str(folder), "--once", "--json"], ["report", str(folder), "--json"]):
        proc = connwatch_cli(*args, CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder),
                             CONNWATCH_SNAPSHOT_INTERVAL="0.05")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        pids = [p["pid"] for p in (data if isinstance(data, list) else data["processes"])]
        assert pids == [app.pid]
    assert sorted(p.name for p in folder.iterdir()) == [app.path.name]
