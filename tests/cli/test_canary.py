"""``connwatch canary``: groups of real agent processes (a baseline holding 12 connections at a
line, a canary reaching the same 12 by a slow leak, one holding one more, one holding twice as
many) judged from their snapshot folders and, through a real Prometheus scraping the same
kind of processes, from their series: the same verdicts."""

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
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.conftest import clean_env

from .conftest import connwatch_cli, validate

APP = Path(__file__).resolve().parent / "canaryapp.py"
LINE = next(i for i, ln in enumerate(APP.read_text().splitlines(), 1) if "create_connection" in ln)
CHURN_LINE = next(i for i, ln in enumerate(APP.read_text().splitlines(), 1) if "create_connection" in ln and i > LINE)
EVERY = "0.55"  # the canary's leak: one more connection every 0.55 s (the scenario)


class Agent:
    """A canaryapp.py process with the agent on, writing snapshots every 0.5 s (a leak window of 4 s)."""

    def __init__(self, folder: Path, args: List[str], port: int, prom_port: Optional[int] = None) -> None:
        env = clean_env(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder), CONNWATCH_SNAPSHOT_INTERVAL="0.5")
        if prom_port:
            env.update(CONNWATCH_EXPORTER="prometheus", CONNWATCH_PROMETHEUS_PORT=str(prom_port))
        self.prom_port = prom_port
        self.proc = subprocess.Popen([sys.executable, str(APP), args[0], str(port), *args[1:]], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.path = folder / f"{os.uname().nodename}-{self.proc.pid}.json"

    def ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"canaryapp did not start: {line!r}"

    def row(self) -> Optional[Dict[str, Any]]:
        """The app line's row in the latest snapshot (None before the first)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        rows = [r for r in data["callsites"] if r["line"] == LINE and r["file"] == str(APP)]
        return rows[0] if rows else None

    def live(self) -> Optional[int]:
        row = self.row()
        return None if row is None else int(row["live"])

    def flat(self) -> bool:
        """Its leak window (8 snapshots) is past its start: no growth, nothing created in it."""
        row = self.row()
        return row is not None and row.get("growth_samples", 0) >= 8 and row.get("growth_per_min") == 0 \
            and (row.get("churn") or {}).get("created_in_window", 0) == 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    """start({group: [args...]}, port, prom_ports) -> {group: [Agent]}; all stopped at the end."""
    started: List[Agent] = []

    def start(groups: Dict[str, List[str]], port: int, count: int = 3,
              prom_ports: Optional[Dict[str, List[int]]] = None) -> Dict[str, List[Agent]]:
        out: Dict[str, List[Agent]] = {}
        for name, args in groups.items():
            ports = (prom_ports or {}).get(name) or [None] * count
            out[name] = [Agent(tmp_path / "live" / name, args, port, ports[i]) for i in range(count)]
            started.extend(out[name])
        for group in out.values():  # all started before any is waited for: the groups run side by side
            for agent in group:
                agent.ready()
        return out

    yield start
    for agent in started:
        agent.stop()


def _wait_flat(agents: List[Agent], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(a.flat() for a in agents):
            return
        time.sleep(0.1)
    raise AssertionError(f"not flat: {[a.row() for a in agents]}")


def _wait_all(agents: List[Agent], n: int, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(a.live() == n for a in agents):
            return
        time.sleep(0.05)
    raise AssertionError(f"not all at {n}: {[a.live() for a in agents]}")


def _freeze(tmp_path: Path, names: List[str]) -> Dict[str, Path]:
    """Copy each group's snapshot files as they are now: the folders a pipeline collects."""
    out = {}
    for name in names:
        dest = tmp_path / "frozen" / name
        dest.mkdir(parents=True)
        for f in (tmp_path / "live" / name).glob("*.json"):
            shutil.copy(f, dest / f.name)
        out[name] = dest
    return out


def _site(result: Dict[str, Any], line: int = LINE) -> Dict[str, Any]:
    rows = [s for s in result["sites"] if s["line"] == line and s["file"] == str(APP)]
    assert len(rows) == 1, result["sites"]
    return rows[0]


def _judge(*args: str) -> Any:
    proc = connwatch_cli("canary", *args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    result = json.loads(proc.stdout)
    assert proc.returncode == (0 if result["verdict"] == "pass" else 1)
    return result


GROUPS = {"baseline": ["hold", "12"], "canary": ["slow", "12", EVERY], "plusone": ["hold", "13"],
          "double": ["hold", "24"], "churner": ["churn", "12", "0.05"]}


def _start_groups(fleet: Any, port: int, names: List[str], **kw: Any) -> Tuple[Dict[str, List[Agent]], float]:
    """The holding groups first, until their leak windows are past their start-up (as in a
    baseline that has run for a while); then the canary, whose leak starts with it. Returns the
    agents and the time the canary started."""
    agents = fleet({n: GROUPS[n] for n in names if n != "canary"}, port, **kw)
    _wait_flat([a for group in agents.values() for a in group])
    started = time.time()
    agents.update(fleet({"canary": GROUPS["canary"]}, port, **kw))
    _wait_all(agents["canary"], 12)  # the folders are taken as the canary reaches 12
    return agents, started


def test_slow_leak_fails_noise_and_one_more_pass(fleet: Any, tcp_server: Any, tmp_path: Path) -> None:
    agents, _started = _start_groups(fleet, tcp_server.port, list(GROUPS))
    assert [a.live() for a in agents["double"]] == [24] * 3
    folders = _freeze(tmp_path, list(GROUPS))
    for f in folders["canary"].glob("*.json"):  # the canary: every snapshot says so
        data = json.loads(f.read_text())
        validate(data)
        row = next(r for r in data["callsites"] if r["line"] == LINE)
        assert row["live"] == 12 and row["suspected_leak"] is True and row["growth_per_min"] > 30, row

    base, canary = str(folders["baseline"]), str(folders["canary"])
    # connwatch diff behaves as today: equal totals, so its gate passes the slow leak.
    proc = connwatch_cli("diff", base, canary, "--max-growth", "5")
    assert proc.returncode == 0 and "result: PASS" in proc.stdout, proc.stdout + proc.stderr

    proc = connwatch_cli("canary", base, canary)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if f"canaryapp.py:{LINE}" in ln)
    assert line.lstrip().startswith("FAIL") and "12 -> 12" in line
    assert "a slow leak" in proc.stdout and proc.stdout.rstrip().splitlines()[-1].startswith("result: FAIL")
    result = _judge(base, canary)
    site = _site(result)
    assert result["verdict"] == "fail" and result["score"] < 100
    assert (site["verdict"], site["kind"], site["function"]) == ("fail", "socket", "connect")
    assert "grows steadily in the canary (3 of 3 processes" in site["reason"]
    assert site["baseline"]["live"]["mean"] == 12 and site["canary"]["live"]["mean"] == 12
    assert site["baseline"]["steady_growth"] == 0 and site["canary"]["steady_growth"] == 3
    assert site["canary"]["growth_per_min"]["median"] > 30
    assert site["tests"]["created_per_min"]["result"] == "higher" and "creates more clients" in site["reason"]
    assert result["baseline"]["processes"] == 3 and result["canary"]["processes"] == 3

    # One more client per process at a 12-client site: the rank test sees it, the tolerance lets it pass.
    result = _judge(base, str(folders["plusone"]))
    site = _site(result)
    assert result["verdict"] == "pass" and site["verdict"] == "pass", site
    assert site["tests"]["live"]["shift"] == 1 and site["tests"]["live"]["result"] == "same"
    assert "12 -> 13, within the tolerance 3" in site["reason"]
    # Twice as many: a real shift fails.
    result = _judge(base, str(folders["double"]))
    site = _site(result)
    assert result["verdict"] == "fail" and site["verdict"] == "fail"
    assert "live clients per process 12 -> 24 (+12, over the tolerance 3; rank test p=0.05)" in site["reason"]
    # Noise: the baseline against itself, and the canary's flags are thresholds.
    assert _judge(base, base)["verdict"] == "pass"
    assert _judge(base, canary, "--leak-share", "1.0")["verdict"] == "fail"
    # The leak also creates clients at ~100/min where the baseline creates none (the snapshots' churn).
    assert _judge(base, canary, "--min-growth", "100000")["verdict"] == "fail"
    assert _judge(base, canary, "--min-growth", "100000", "--min-churn", "100000")["verdict"] == "pass"
    assert _judge(base, str(folders["double"]), "--tolerance", "1.5")["verdict"] == "pass"


def test_bad_input_exits_2_with_a_message(fleet: Any, tcp_server: Any, tmp_path: Path) -> None:
    agent = fleet({"good": ["hold", "1"]}, tcp_server.port, count=1)["good"][0]
    _wait_all([agent], 1)
    agent.stop()
    good = tmp_path / "live" / "good"
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.json").write_text(agent.path.read_text()[:50])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "package.json").write_text('{"name": "left-pad"}')
    cases = {tmp_path / "missing": "no such file or folder", empty: "no snapshot files in",
             corrupt: "corrupt or truncated", foreign: "not a connwatch snapshot"}
    for other, words in cases.items():
        for args in ((str(good), str(other)), (str(other), str(good))):
            proc = connwatch_cli("canary", *args)
            assert proc.returncode == 2, (other, proc.stdout, proc.stderr)
            assert proc.stderr.startswith("connwatch: canary: ") and words in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr and proc.stdout == ""
    # A bad file next to good ones is skipped, said so, and the rest is judged.
    shutil.copy(corrupt / "a.json", good / "b.json")
    proc = connwatch_cli("canary", str(good), str(good))
    assert proc.returncode == 0 and "skipped" in proc.stderr and "b.json" in proc.stderr
    assert connwatch_cli("canary", str(good)).returncode == 2
    assert connwatch_cli("canary", str(good), str(good), "--alpha", "0").returncode == 2
    assert connwatch_cli("canary", str(good), str(good), "--canary", str(good)).returncode == 2
    proc = connwatch_cli("canary", "--prometheus", "http://127.0.0.1:9", "--baseline", 'job="a"',
                         "--canary", 'job="b"', "--window", "5 minutes")
    assert proc.returncode == 2 and "not a duration" in proc.stderr
    proc = connwatch_cli("canary", "--prometheus", "http://127.0.0.1:9", "--baseline", 'job="a"',
                         "--canary", 'job="b"', "--timeout", "5")
    assert proc.returncode == 2 and "cannot reach Prometheus at http://127.0.0.1:9" in proc.stderr


# --- the same judge over Prometheus ---------------------------------------------------------------

def _prom_query(port: int, query: str) -> List[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]  # type: ignore[no-any-return]


def _wait_prom(port: int, query: str, pred: Any, server: Any, timeout: float = 40.0) -> List[Any]:
    deadline = time.monotonic() + timeout
    got: List[Any] = []
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError("prometheus exited: " + server.communicate()[1][-3000:])
        try:
            got = _prom_query(port, query)
        except OSError:
            got = []
        if pred(got):
            return got
        time.sleep(0.2)
    raise AssertionError(f"prometheus: {query} never held; last {got}")


def test_prometheus_form_gives_the_same_verdicts(fleet: Any, tcp_server: Any, tmp_path: Path) -> None:
    from tests.exporters.conftest import free_port, start_prometheus, stop_prometheus
    from tests.exporters.test_prometheus import require_tool

    prom = require_tool("prometheus")
    names = ["baseline", "canary", "plusone", "churner"]
    ports = {name: [free_port() for _ in range(3)] for name in names}
    server, prom_port = start_prometheus(prom, {
        "global": {"scrape_interval": "500ms", "scrape_timeout": "500ms", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports[name]]}]}
                           for name in names],
    }, tmp_path)
    url = f"http://127.0.0.1:{prom_port}"
    try:
        _wait_prom(prom_port, "vector(1)", bool, server)
        agents, started = _start_groups(fleet, tcp_server.port, names, prom_ports=ports)
        assert [a.live() for a in agents["plusone"]] == [13] * 3
        folders = _freeze(tmp_path, names)
        # Prometheus has scraped the canary at its 12.
        _wait_prom(prom_port, f'sum by (instance) (connwatch_clients_live{{job="canary",code_line_number="{LINE}"}})',
                   lambda r: len(r) == 3 and all(float(s["value"][1]) == 12 for s in r), server)
        # The window of the canary's life up to now (the holding groups have been flat since
        # before it), pinned with --end so every query below judges the same window.
        end = time.time()
        window = ["--prometheus", url, "--window", f"{end - started + 1:.1f}s", "--step", "0.5s", "--end", f"{end:.3f}"]
        for other, verdict in (("canary", "fail"), ("plusone", "pass")):
            from_files = _judge(str(folders["baseline"]), str(folders[other]))
            from_prom = _judge(*window, "--baseline", 'job="baseline"', "--canary", f'{{job="{other}"}}')
            assert from_files["verdict"] == from_prom["verdict"] == verdict, (from_files, from_prom)
            a, b = _site(from_files), _site(from_prom)
            both = json.dumps([a, b])
            assert a["verdict"] == b["verdict"] == verdict, both
            assert (a["baseline"]["live"], a["canary"]["live"]) == (b["baseline"]["live"], b["canary"]["live"]), both
            assert from_prom["baseline"]["processes"] == from_prom["canary"]["processes"] == 3
            assert from_prom["baseline"]["names"][0].startswith("baseline/127.0.0.1:")
        # A canary that builds a client per call at a new line (each closed at once): nothing live
        # there, but the same "client per call" failure from its files and from its series.
        from_files = _judge(str(folders["baseline"]), str(folders["churner"]))
        from_prom = _judge(*window, "--baseline", 'job="baseline"', "--canary", 'job="churner"')
        for result in (from_files, from_prom):
            site = _site(result, CHURN_LINE)
            assert result["verdict"] == "fail" and site["verdict"] == "fail", json.dumps(site)
            assert "builds a client per call" in site["reason"] and site["canary"]["churning"] == 3, json.dumps(site)
            assert _site(result)["verdict"] == "pass"  # its 12 held clients are the baseline's
        from_prom = _judge(*window, "--baseline", 'job="baseline"', "--canary", 'job="plusone"')
        assert _site(from_prom)["canary"]["churning"] == 0
        from_prom = _judge(*window, "--baseline", 'job="baseline"', "--canary", 'job="canary"')
        site = _site(from_prom)
        assert "a slow leak" in site["reason"] and site["canary"]["steady_growth"] == 3, site
        assert site["canary"]["growth_per_min"]["median"] > 30 and site["baseline"]["growth_per_min"]["max"] == 0
        assert from_prom["fds"] is not None
        # A selector nothing matches, and a query Prometheus refuses: exit 2 with its words.
        proc = connwatch_cli("canary", *window, "--baseline", 'job="baseline"', "--canary", 'job="nobody"')
        assert proc.returncode == 2 and "no connwatch series for the canary selector" in proc.stderr
        proc = connwatch_cli("canary", *window, "--baseline", 'job="baseline"', "--canary", 'job=~"("')
        assert proc.returncode == 2 and "refused the query" in proc.stderr, proc.stderr
    finally:
        stop_prometheus(server)
