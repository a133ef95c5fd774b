"""The Prometheus exporter: our /metrics, scraped by the real Debian prometheus binary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import pytest

from .conftest import SITES_SNIPPET, free_port, sites, start_prometheus, stop_prometheus, write_app

PROM_APP = """
import os, socket, sys, time, urllib.request
import connwatch
from connwatch import exporters
assert exporters.wait_ready(20)
keep = []
def leak():
    for _ in range(4):
        keep.append(socket.create_connection(("127.0.0.1", int(os.environ["TARGET_PORT"]))))  # MARK:leak
leak()
print("ready", flush=True)
sys.stdin.readline()
""" + SITES_SNIPPET


def _start_app(tmp_path: Path, port: int, target_port: int) -> Any:
    from tests.conftest import clean_env

    path, marks = write_app(tmp_path, PROM_APP)
    env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_SNAPSHOT_INTERVAL="0", CONNWATCH_DIR=str(tmp_path / "s"),
                    CONNWATCH_EXPORTER="prometheus", CONNWATCH_PROMETHEUS_PORT=str(port),
                    TARGET_PORT=str(target_port))
    proc = subprocess.Popen([sys.executable, str(path)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, path, marks


def _finish(proc: Any) -> str:
    out, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err
    return str(out)


def _parse(text: str) -> List[Dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        lab = {}
        for item in labels.rstrip("}").split('",') if labels else []:
            k, _, v = item.partition('="')
            lab[k] = v.rstrip('"')
        rows.append({"name": name, "labels": lab, "value": float(value)})
    return rows


def test_metrics_endpoint_shows_the_leak_and_is_not_counted(tmp_path: Path, tcp_server: Any) -> None:
    port = free_port()
    proc, path, marks = _start_app(tmp_path, port, tcp_server.port)
    try:
        for _ in range(5):  # scrapes are the agent's own connections: they never count
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = r.read().decode()
    finally:
        out = _finish(proc)
    rows = _parse(text)
    leak = [r for r in rows
            if r["name"] == "connwatch_clients_live" and r["labels"].get("code_line_number") == str(marks["leak"])]
    assert any(r["value"] == 4 and r["labels"]["server_port"] == str(tcp_server.port)
               and r["labels"]["code_file_path"] == str(path) and r["labels"]["connwatch_client_kind"] == "socket"
               for r in leak), leak
    names = {r["name"] for r in rows}
    assert {"connwatch_clients_created_total", "process_unix_file_descriptor_count", "connwatch_fd_limit",
            "connwatch_fd_utilization"} <= names
    foreign = [s for s in sites(out) if s[2] != str(path)]
    assert not foreign, foreign


def test_busy_port_warns_once_and_the_app_runs(tmp_path: Path) -> None:
    import socket

    from .conftest import run_app

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        path, _ = write_app(tmp_path, "import connwatch\nfrom connwatch import exporters\n"
                            "exporters.wait_ready(20)\nprint(connwatch.is_enabled())\n")
        proc = run_app(path, CONNWATCH_EXPORTER="prometheus", CONNWATCH_PROMETHEUS_PORT=str(taken.getsockname()[1]))
    finally:
        taken.close()
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert proc.stderr.count("cannot serve Prometheus metrics") == 1, proc.stderr


def require_tool(name: str) -> str:
    """The tool's path; outside CI a missing tool skips with a printed reason, in CI it fails."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed (scripts/test.sh installs Debian's prometheus package)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {reason}")
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def test_real_prometheus_scrapes_the_agent(tmp_path: Path, tcp_server: Any) -> None:
    prom = require_tool("prometheus")
    port = free_port()
    proc, path, marks = _start_app(tmp_path, port, tcp_server.port)
    server, prom_port = start_prometheus(prom, {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "connwatch", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }, tmp_path)
    query = (f'connwatch_clients_live{{code_line_number="{marks["leak"]}",'
             f'code_file_path="{path}",server_port="{tcp_server.port}"}}')
    result: List[Any] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            if server.poll() is not None:
                break
            try:
                url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
                with urllib.request.urlopen(url, timeout=5) as r:
                    result = json.loads(r.read())["data"]["result"]
            except OSError:
                continue
    finally:
        err = stop_prometheus(server)
        _finish(proc)
    assert result, f"prometheus never saw {query}; its log:\n{err[-3000:]}"
    sample = result[0]
    assert sample["metric"]["job"] == "connwatch"
    assert sample["metric"]["connwatch_client_kind"] == "socket"
    assert float(sample["value"][1]) == 4.0


CHURN_APP = """
import socket, sys
from connwatch import exporters
assert exporters.wait_ready(20)
listener = socket.create_server(("127.0.0.1", 0))
def per_call():
    c = socket.create_connection(listener.getsockname())  # MARK:churn
    a, _ = listener.accept()  # MARK:accept
    a.close()
    c.close()
for _ in range(12):
    per_call()
print("ready", flush=True)
sys.stdin.readline()
"""


def test_short_lived_clients_are_exported_per_call_site(tmp_path: Path) -> None:
    from tests.conftest import clean_env

    path, marks = write_app(tmp_path, CHURN_APP)
    port = free_port()
    env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_SNAPSHOT_INTERVAL="0", CONNWATCH_DIR=str(tmp_path / "s"),
                    CONNWATCH_EXPORTER="prometheus", CONNWATCH_PROMETHEUS_PORT=str(port))
    proc = subprocess.Popen([sys.executable, str(path)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            rows = _parse(r.read().decode())
    finally:
        _finish(proc)
    short = {r["labels"]["code_line_number"]: r["value"] for r in rows
             if r["name"] == "connwatch_clients_short_lived_total" and r["labels"]["code_file_path"] == str(path)}
    assert short.get(str(marks["churn"])) == 12.0, short
    # A server's accepted sockets are its normal traffic: never counted as churn.
    assert short.get(str(marks["accept"]), 0.0) == 0.0, short
