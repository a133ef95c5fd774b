"""A real pre-fork server: gunicorn (sync workers, 3 of them) serving real requests, with the
agent loaded by CONNWATCH_ENABLED and an OTLP exporter whose collector is down. Each worker writes
its own file with exactly the clients its requests leaked; the master's file has none of them;
every worker runs one snapshot writer and one exporter thread (none duplicated, none lost)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tests.conftest import clean_env

from .conftest import snapshot_files, totals, write_app

pytest.importorskip("gunicorn")

WSGI_APP = '''\
import json, os, socket, threading

UPSTREAM = ("127.0.0.1", int(os.environ["UPSTREAM_PORT"]))
LEAKED = []

def app(environ, start_response):
    LEAKED.append(socket.create_connection(UPSTREAM))  # MARK:leak
    body = json.dumps({"pid": os.getpid(), "threads": [t.name for t in threading.enumerate()],
                       "query": environ.get("QUERY_STRING", "")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> Dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def _wait_booted(log: Path, workers: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if text.count("Booting worker") >= workers:
            return
        assert proc.poll() is None, text
        time.sleep(0.05)
    raise AssertionError("gunicorn did not start: " + (log.read_text() if log.exists() else ""))


@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_gunicorn_workers_each_write_their_own_counts(tmp_path: Path, preload: bool) -> None:
    path, marks = write_app(tmp_path, WSGI_APP, name="wsgiapp.py")
    folder = tmp_path / "snap"
    upstream = socket.create_server(("127.0.0.1", 0), backlog=1000)  # never accepts: the kernel does
    port = _free_port()
    dead = _free_port()
    log = tmp_path / "gunicorn.log"
    args = [sys.executable, "-m", "gunicorn", "-w", "3", "-k", "sync", "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", "10", "--chdir", str(tmp_path)]
    if preload:
        args.append("--preload")
    env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder), CONNWATCH_SNAPSHOT_INTERVAL="0.2",
                    CONNWATCH_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"http://127.0.0.1:{dead}",
                    OTEL_METRIC_EXPORT_INTERVAL="200", OTEL_EXPORTER_OTLP_TIMEOUT="1",
                    UPSTREAM_PORT=str(upstream.getsockname()[1]))
    with log.open("w") as err:
        proc = subprocess.Popen([*args, "wsgiapp:app"], env=env, stdout=err, stderr=err, cwd=str(tmp_path))
    try:
        _wait_booted(log, 3, proc)
        served: Dict[int, int] = {}
        threads: Dict[int, List[str]] = {}
        for i in range(45):
            reply = _get(port, f"/x?i={i}")
            pid = int(reply["pid"])  # type: ignore[call-overload]
            served[pid] = served.get(pid, 0) + 1
            threads[pid] = reply["threads"]  # type: ignore[assignment]
        time.sleep(0.5)  # a few periodic writes while the workers run
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        upstream.close()
    text = log.read_text()
    assert "Traceback" not in text, text
    master = proc.pid
    assert master not in served
    for pid, names in threads.items():
        # one writer, one exporter per worker: restarted after the fork, never duplicated
        assert names.count("connwatch-snapshot") == 1, (pid, names)
        assert names.count("connwatch-exporter") == 1, (pid, names)
    files = snapshot_files(folder)
    assert set(served) <= set(files), (served, sorted(files))
    for pid, n in served.items():
        assert totals(files[pid], path, marks["leak"], "socket") == (n, n, 0), (pid, n)
    # the master's file (if it made one) holds none of the workers' clients
    if master in files:
        assert totals(files[master], path, marks["leak"]) == (0, 0, 0)
    # every file with the leak belongs to a worker that served: no one wrote another's file
    for pid, data in files.items():
        if totals(data, path, marks["leak"]) != (0, 0, 0):
            assert pid in served, pid
    assert sum(served.values()) == 45
    assert os.path.isdir(folder) and (folder.stat().st_mode & 0o777) == 0o700
