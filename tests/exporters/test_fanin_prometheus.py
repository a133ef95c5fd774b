"""The fleet view through the engine users already run: a real Prometheus scrapes several real
agent processes (two services) with the shipped rules loaded, and the recording rules sum their
live clients per upstream, per service and per call site (checked with PromQL over its HTTP API)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from tests.conftest import REPO, Server, clean_env

from .conftest import free_port, start_prometheus, stop_prometheus
from .test_prometheus import require_tool

HOLDER = textwrap.dedent("""
    import os, socket, sys
    from connwatch import exporters
    assert exporters.wait_ready(20)
    def hold(port, n):
        out = []
        for _ in range(n):
            out.append(socket.create_connection(("127.0.0.1", port)))
        return out
    held = hold(int(sys.argv[1]), int(sys.argv[2]))
    if len(sys.argv) > 3:
        held += hold(int(sys.argv[3]), int(sys.argv[4]))
    print("ready", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture(scope="module")
def second_server() -> Iterator[Server]:
    s = Server("tcp")
    yield s
    s.stop()


def _query(prom_port: int, expr: str) -> List[Dict[str, Any]]:
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]  # type: ignore[no-any-return]


def _values(result: List[Dict[str, Any]], *labels: str) -> Dict[Tuple[str, ...], float]:
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in result}


def test_recording_rules_sum_fan_in_over_real_agents(tmp_path: Path, tcp_server: Server,
                                                      second_server: Server) -> None:
    prom = require_tool("prometheus")
    app = tmp_path / "holder.py"
    app.write_text(HOLDER)
    # (service, clients to A, clients to B): the "monolith" has 3 instances, "batch" one.
    plan = [("monolith", 4, 0), ("monolith", 4, 0), ("monolith", 4, 1), ("batch", 2, 3)]
    procs: List[subprocess.Popen] = []
    targets: Dict[str, List[str]] = {}
    server = None
    try:
        for service, to_a, to_b in plan:
            port = free_port()
            argv = [sys.executable, str(app), str(tcp_server.port), str(to_a)]
            if to_b:
                argv += [str(second_server.port), str(to_b)]
            env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_SNAPSHOT_INTERVAL="0", CONNWATCH_DIR=str(tmp_path / "s"),
                            CONNWATCH_EXPORTER="prometheus", CONNWATCH_PROMETHEUS_PORT=str(port),
                            CONNWATCH_SERVICE=service)
            p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            targets.setdefault(service, []).append(f"127.0.0.1:{port}")
        # The shipped rules, evaluated every second instead of every 30 s (same expressions).
        rules = (REPO / "deploy" / "prometheus" / "connwatch-rules.yml").read_text()
        assert rules.count("interval: 30s") >= 2
        (tmp_path / "rules.yml").write_text(rules.replace("interval: 30s", "interval: 1s"))
        server, prom_port = start_prometheus(prom, {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()],
        }, tmp_path)
        a_port, b_port = str(tcp_server.port), str(second_server.port)
        want = {("127.0.0.1", a_port): 14.0, ("127.0.0.1", b_port): 4.0}
        by_upstream: Dict[Tuple[str, ...], float] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and by_upstream != want:
            time.sleep(0.5)
            if server.poll() is not None:
                break
            try:
                by_upstream = _values(_query(prom_port, "connwatch:upstream_clients_live:sum"),
                                      "server_address", "server_port")
                instances = _values(_query(prom_port, "up"), "instance")
                if len(instances) < len(plan):
                    by_upstream = {}  # not every agent scraped yet
            except OSError:
                continue
        assert by_upstream == want, f"fan-in per upstream: {by_upstream} (prometheus exited: {server.poll()})"
        by_service = _values(_query(prom_port, "connwatch:upstream_clients_live:sum_by_service"),
                             "server_port", "job")
        assert by_service == {(a_port, "monolith"): 12.0, (a_port, "batch"): 2.0,
                              (b_port, "monolith"): 1.0, (b_port, "batch"): 3.0}
        site_expr = f'connwatch:upstream_clients_live:sum_by_callsite{{server_port="{a_port}"}}'
        by_site = _values(_query(prom_port, site_expr), "job", "code_function_name", "code_file_path",
                          "connwatch_client_kind")
        assert by_site == {("monolith", "hold", str(app), "socket"): 12.0, ("batch", "hold", str(app), "socket"): 2.0}
        count = _values(_query(prom_port, "connwatch:upstream_instances:count"), "server_port")
        assert count == {(a_port,): 4.0, (b_port,): 2.0}
    finally:
        if server is not None:
            stop_prometheus(server)
        for p in procs:
            try:
                p.communicate("\n", timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
