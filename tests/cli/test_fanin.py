"""Fan-in: ``connwatch report DIR --by upstream`` and ``connwatch top --by upstream`` sum the
live clients of every process in a folder per upstream, exactly (real forked workers holding
real loopback connections to two real servers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from tests.conftest import Server, clean_env

from .conftest import connwatch_cli

# A "monolith" that forks WORKERS workers; each holds PER_WORKER connections to the small
# service A (at hold_a), and worker 0 also 2 to service B (at hold_b). Each worker exits
# normally, so the agent writes its final snapshot file; the parent makes no client.
FORKING_APP = textwrap.dedent("""
    import os, socket, sys
    port_a, port_b, workers, per = (int(x) for x in sys.argv[1:5])
    def hold_a():
        out = []
        for _ in range(per):
            out.append(socket.create_connection(("127.0.0.1", port_a)))
        return out
    def hold_b():
        out = []
        for _ in range(2):
            out.append(socket.create_connection(("127.0.0.1", port_b)))
        return out
    kids = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            held = hold_a() + (hold_b() if i == 0 else [])
            sys.exit(0)  # a normal exit: atexit writes the final snapshot
        kids.append(pid)
    for pid in kids:
        assert os.waitpid(pid, 0)[1] == 0
    print("done", flush=True)
""")


@pytest.fixture(scope="module")
def second_server() -> Iterator[Server]:
    s = Server("tcp")
    yield s
    s.stop()


def _run_monolith(folder: Path, app: Path, service: str, port_a: int, port_b: int, workers: int, per: int) -> None:
    env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder), CONNWATCH_SNAPSHOT_INTERVAL="0",
                    CONNWATCH_SERVICE=service)
    proc = subprocess.run([sys.executable, str(app), str(port_a), str(port_b), str(workers), str(per)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr


def _fleet(tmp_path: Path, a: Server, b: Server) -> Path:
    folder = tmp_path / "snaps"
    app = tmp_path / "monolith.py"
    app.write_text(FORKING_APP)
    _run_monolith(folder, app, "api", a.port, b.port, 2, 5)      # 2 workers x 5 to A, 2 to B
    _run_monolith(folder, app, "worker", a.port, b.port, 1, 5)   # 1 worker x 5 to A, 2 to B
    assert len(list(folder.glob("*.json"))) == 3, sorted(os.listdir(folder))
    return folder


def test_report_by_upstream_sums_three_processes_exactly(tmp_path: Path, tcp_server: Server,
                                                         second_server: Server) -> None:
    folder = _fleet(tmp_path, tcp_server, second_server)
    # Each process on its own holds only 5 (or 7): nothing alarming per process.
    per_process = json.loads(connwatch_cli("report", str(folder), "--json").stdout)
    assert sorted(p["totals"]["live"] for p in per_process) == [5, 7, 7]

    proc = connwatch_cli("report", str(folder), "--by", "upstream", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ups: Dict[str, Any] = {u["upstream"]: u for u in data["upstreams"]}
    a, b = ups[tcp_server.upstream], ups[second_server.upstream]
    assert [u["upstream"] for u in data["upstreams"]] == [tcp_server.upstream, second_server.upstream]
    assert (a["live"], a["processes"], a["services"]) == (15, 3, ["api", "worker"])
    assert (b["live"], b["processes"], b["services"]) == (4, 2, ["api", "worker"])
    (site_a,) = a["callsites"]
    assert (site_a["function"], site_a["kind"], site_a["live"], site_a["processes"]) == ("hold_a", "socket/client",
                                                                                         15, 3)
    assert site_a["file"] == str(tmp_path / "monolith.py") and isinstance(site_a["line"], int)
    assert [(c["function"], c["live"]) for c in b["callsites"]] == [("hold_b", 4)]
    assert set(site_a) == {"file", "line", "function", "kind", "live", "processes"}

    text = connwatch_cli("report", str(folder), "--by", "upstream")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "fan-in: 19 live clients to 2 upstream(s) from 3 processes" in out
    assert f"{tcp_server.upstream}: 15 live from 3 processes (services: api, worker)" in out
    row = next(ln for ln in out.splitlines() if "(hold_a)" in ln)
    assert row.split()[:3] == ["15", "3", "socket/client"]
    assert out.index(tcp_server.upstream) < out.index(second_server.upstream)  # biggest first


def test_top_upstream_view(tmp_path: Path, tcp_server: Server, second_server: Server) -> None:
    folder = _fleet(tmp_path, tcp_server, second_server)
    proc = connwatch_cli("top", str(folder), "--once", "--by", "upstream")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("UPSTREAM"))
    first, second = lines[head + 1].split(), lines[head + 2].split()
    assert first[:4] == [tcp_server.upstream, "15", "3", "api,worker"]
    assert "monolith.py:" in lines[head + 1] and "hold_a x15" in lines[head + 1]
    assert second[:3] == [second_server.upstream, "4", "2"]
    # The machine form carries both views.
    data = json.loads(connwatch_cli("top", str(folder), "--once", "--json").stdout)
    assert [(u["upstream"], u["live"]) for u in data["upstreams"]] == [(tcp_server.upstream, 15),
                                                                        (second_server.upstream, 4)]
    assert len(data["processes"]) == 3
