"""The ops kit: Prometheus rules (promtool check + unit tests) and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import subprocess

from tests.conftest import REPO

from .test_prometheus import require_tool

DEPLOY = REPO / "deploy"
# Every metric name our /metrics serves (connwatch/exporters/prometheus.py).
EXPOSED = {"connwatch_clients_live", "connwatch_clients_created_total", "connwatch_clients_short_lived_total",
           "connwatch_cap_exceeded_total",
           "process_unix_file_descriptor_count", "connwatch_fd_limit", "connwatch_fd_utilization"}


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    proc = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "connwatch-rules.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    proc = subprocess.run([promtool, "test", "rules", "connwatch-rules.test.yml"], cwd=DEPLOY / "prometheus",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _names(expr: str) -> set:
    found = re.findall(r"[a-z_:]+", expr)
    return {m for m in found if m.startswith(("connwatch_", "process_unix")) and m != "connwatch_client_kind"}


def test_dashboard_and_rules_use_exposed_metric_names() -> None:
    dash = json.loads((DEPLOY / "grafana" / "connwatch-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    titles = {p["title"] for p in dash["panels"]}
    assert {"Live clients by call site", "File descriptor utilisation", "Cap hits (per 5 minutes)",
            "Clients into each upstream, by calling service", "Clients into each upstream, by call site"} <= titles
    fanin = [t["expr"] for p in dash["panels"] if p["title"].startswith("Clients into each upstream")
             for t in p["targets"]]
    assert all("server_address" in e and "server_port" in e for e in fanin), fanin
    used = set().union(*(_names(e) for e in exprs))
    assert used and used <= EXPOSED, used - EXPOSED
    rules = (DEPLOY / "prometheus" / "connwatch-rules.yml").read_text()
    assert _names(rules) <= EXPOSED, _names(rules) - EXPOSED
