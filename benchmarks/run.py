"""connwatch overhead, side by side with the tools users would pick instead, in one run.

    python benchmarks/run.py [--quick] [--rounds R] [--json]

Every workload runs in a fresh interpreter per configuration, alternating configurations
within each round; the result is the median over rounds of each run's median, and the
ratio to the no-agent run of the same round set:

  none         plain interpreter
  connwatch    CONNWATCH_ENABLED=1 (the .pth hook starts the agent; its C hot path)
  connwatch-py the same with CONNWATCH_PURE_PYTHON=1 (where the extension could not be built)
  tracemalloc  CPython's own leak finder: -X tracemalloc=16 -W always::ResourceWarning
  otel         OpenTelemetry requests/urllib3/grpc instrumentation, SDK TracerProvider

Workloads: socket()+close; loopback TCP connect+close (and asyncio.open_connection+close on a
uvloop loop, whose socket libuv opens; 10 per loop run); an HTTP request on a new connection
through requests; grpc channel create + one unary call + close; socket()+close and the grpc
workload at a 40-frame user stack. Then each tool's own cost on the calling thread, in one
interpreter per workload and tool switching it on and off between batches (``_toggle.py``, with
an A/A control), user-space instruction counts, memory per live tracked client (sockets and
urllib3 PoolManagers), the cost of one snapshot and one metric collection at 10 / 1,000 /
10,000 call sites, and interpreter start-up with the agent not installed, installed but off,
and on.

It measures the installed connwatch (``pip install .``, as scripts/test.sh does), not the
checkout: the wheel carries the compiled extension. The servers run in their own processes on
127.0.0.1. This is a benchmark, not a test:
nothing here asserts a time; --quick only shows it still runs (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = ("none", "connwatch", "connwatch-py", "tracemalloc", "otel")
AGENTS = ("connwatch", "connwatch-py")
# workload -> (ops per run full, ops per run quick, configs that apply)
WORKLOADS: Dict[str, Tuple[int, int, Tuple[str, ...]]] = {
    "socket()+close": (50000, 2000, ("none", *AGENTS, "tracemalloc")),
    "socket()+close@40": (50000, 2000, ("none", *AGENTS, "tracemalloc")),
    "connect+close (loopback TCP)": (5000, 300, ("none", *AGENTS, "tracemalloc")),
    "uvloop connect+close": (3000, 200, ("none", *AGENTS, "tracemalloc")),
    "requests.get, new connection": (1500, 100, CONFIGS),
    "grpc channel+call+close": (500, 50, CONFIGS),
    "grpc channel+call+close@40": (500, 50, CONFIGS),
}

ACCEPT_SERVER = """\
import socket, sys
s = socket.create_server(("127.0.0.1", 0), backlog=1024)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


def _env(config: str, folder: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONNWATCH_", "OTEL_"))}
    env.pop("PYTHONPATH", None)  # the installed package, with its compiled extension
    # Every configuration gets the same variables (the agent installed but off where it is not
    # measured): requests walks os.environ twice per call (proxy lookup), about 1 us a variable.
    env["CONNWATCH_ENABLED"] = "1" if config in AGENTS else "0"
    env["CONNWATCH_PURE_PYTHON"] = "1" if config == "connwatch-py" else "0"
    env["CONNWATCH_DIR"] = folder
    return env


def accelerated() -> bool:
    """Whether the installed connwatch runs its C hot path here."""
    proc = subprocess.run([sys.executable, "-c", "import connwatch._accel as a; print(a.speedups is not None)"],
                          env=_env("none", tempfile.gettempdir()), cwd="/", capture_output=True, text=True,
                          timeout=60)
    return proc.stdout.strip() == "True"


class _Server:
    def __init__(self, argv: List[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNWATCH_")}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        self.target = f"127.0.0.1:{int(self.proc.stdout.readline())}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _measure(config: str, workload: str, n: int, target: str, folder: str,
             seed: Optional[int] = None) -> Optional[Tuple[float, float]]:
    flags = ["-X", "tracemalloc=16", "-W", "always::ResourceWarning"] if config == "tracemalloc" else []
    env = _env(config, folder)
    if seed is not None:
        env["PYTHONHASHSEED"] = str(seed)  # the same in every configuration of a round
    proc = subprocess.run([sys.executable, *flags, str(HERE / "_work.py"), config, workload, str(n), target],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"  [{config} {workload}] failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    cpu, wall = proc.stdout.strip().splitlines()[-1].split()
    return float(cpu), float(wall)


# The agent's work inside the requests and grpc workloads, on its own: what it wraps there is the
# Session (with its PoolManagers) and the grpc channel; grpc's C core opens its own sockets.
COMPONENTS: Dict[str, Tuple[int, int, Tuple[str, ...]]] = {
    "requests.Session()+close": (20000, 500, AGENTS),
    "grpc channel create+close (no call)": (20000, 500, AGENTS),
}

# workload -> (K operations per batch, pairs of batches) for toggled(): a batch lasts about 1 ms or more.
TOGGLE: Dict[str, Tuple[int, int]] = {
    "socket()+close": (200, 600),
    "socket()+close@40": (200, 600),
    "connect+close (loopback TCP)": (40, 600),
    "uvloop connect+close": (2, 600),  # K loop runs of 10 connections each
    "requests.get, new connection": (2, 1500),
    "grpc channel+call+close": (2, 1500),
    "grpc channel+call+close@40": (2, 1500),
    "requests.Session()+close": (50, 600),
    "grpc channel create+close (no call)": (20, 600),
}


@contextlib.contextmanager
def _servers() -> Iterator[Tuple[Callable[[str], str], str]]:
    """The loopback servers (each in its own process) and a scratch folder, for one section:
    yields (the target host:port for a workload, the folder)."""
    servers = {
        "tcp": _Server([sys.executable, "-c", ACCEPT_SERVER]),
        "http": _Server([sys.executable, str(REPO / "tests" / "servers.py"), "http"]),
        "grpc": _Server([sys.executable, str(REPO / "tests" / "patches" / "grpc_server.py"), "sync"]),
    }
    folder = tempfile.mkdtemp(prefix="connwatch-bench-")

    def target_of(workload: str) -> str:
        return servers["grpc" if "grpc" in workload else "http" if "requests" in workload else "tcp"].target

    try:
        yield target_of, folder
    finally:
        for srv in servers.values():
            srv.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _toggle_configs(workload: str) -> Tuple[str, ...]:
    """The configurations toggled() runs for ``workload``: the A/A control and the tools that apply."""
    applies = WORKLOADS[workload][2] if workload in WORKLOADS else COMPONENTS[workload][2]
    return tuple(c for c in CONFIGS if c == "none" or c in applies)


def toggled(quick: bool, workloads: Optional[Dict[str, Tuple[int, int]]] = None) -> List[Dict[str, Any]]:
    """Each tool's own cost on the calling thread, without the differences between processes:
    one interpreter per (workload, configuration) runs ``_toggle.py``, which switches the tool on
    and off between batches of K operations, in random order per pair. ``none`` switches nothing
    (the A/A control). ``workloads``: workload -> (K, pairs), by default all of TOGGLE."""
    rows = []
    with _servers() as (target_of, folder):
        for workload, (k, pairs) in (TOGGLE if workloads is None else workloads).items():
            if quick:
                k, pairs = min(k, 10), 6
            target = target_of(workload)
            row: Dict[str, Any] = {"workload": workload}
            t0 = time.perf_counter()
            for config in _toggle_configs(workload):
                env = {**_env(config, folder), "CONNWATCH_ENABLED": "0"}  # a tool is switched by the script
                proc = subprocess.run([sys.executable, str(HERE / "_toggle.py"), config, workload, str(pairs),
                                       str(k), target, folder], env=env, cwd=folder, capture_output=True,
                                      text=True, timeout=1800)
                if proc.returncode != 0:
                    print(f"  [toggled {config} {workload}] failed: {proc.stderr.strip().splitlines()[-1:]}",
                          file=sys.stderr)
                    continue
                row[config] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  toggled {workload}: {len(row) - 1} configurations, K={k}, {pairs} pairs, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


# workload -> (ops in the short run, ops in the long run) for the instruction counts
INSTR_OPS: Dict[str, Tuple[int, int]] = {
    "socket()+close": (1000, 6000), "socket()+close@40": (1000, 6000), "connect+close (loopback TCP)": (500, 2500),
    "uvloop connect+close": (300, 1500),
    "requests.get, new connection": (100, 400), "grpc channel+call+close": (100, 400),
    "grpc channel+call+close@40": (100, 400),
}


def _instructions_run(config: str, workload: str, n: int, target: str, folder: str) -> Optional[int]:
    proc = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                           sys.executable, str(HERE / "_work.py"), config, workload, str(n), target],
                          env=_env(config, folder), capture_output=True, text=True, timeout=900)
    for line in proc.stderr.splitlines():
        if "I" in line and "refs:" in line:
            return int(line.rsplit(None, 1)[-1].replace(",", ""))
    print(f"  [instructions {config} {workload}] failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return None


def instructions() -> List[Dict[str, Any]]:
    """User-space instructions per operation (valgrind's cachegrind), the difference of a short and
    a long run of the same workload: deterministic where times are noisy. The agent adds no system
    calls (strace shows the same calls per operation), so this is where its cost is."""
    if shutil.which("valgrind") is None:
        print("  (valgrind not installed: no instruction counts)", file=sys.stderr)
        return []

    def ops(n: int) -> int:  # what _work.py runs for n: a warm-up of half a batch, then 5 batches
        batch = max(1, n // 5)
        return max(1, batch // 2) + 5 * batch

    rows = []
    with _servers() as (target_of, folder):
        for workload, (short, long) in INSTR_OPS.items():
            target = target_of(workload)
            row: Dict[str, Any] = {"workload": workload}
            for config in ("none", *AGENTS):
                a = _instructions_run(config, workload, short, target, folder)
                b = _instructions_run(config, workload, long, target, folder)
                if a is not None and b is not None:
                    row[config] = (b - a) / (ops(long) - ops(short))
            rows.append(row)
    return rows


def overhead(rounds: int, quick: bool) -> List[Dict[str, Any]]:
    """Median us/op per workload and configuration, alternating configurations per round; the
    ratios are medians of each round's ratio to that round's no-agent run (same hash seed), which
    cancels the drifts of a shared machine that hit the configurations of one round alike."""
    with _servers() as (target_of, folder):
        results: Dict[str, Dict[str, List[Optional[Tuple[float, float]]]]] = {
            w: {c: [] for c in CONFIGS} for w in WORKLOADS}
        for r in range(rounds):
            for workload, (n_full, n_quick, configs) in WORKLOADS.items():
                target = target_of(workload)
                order = configs if r % 2 == 0 else tuple(reversed(configs))
                for config in order:
                    results[workload][config].append(
                        _measure(config, workload, n_quick if quick else n_full, target, folder, seed=r + 1))
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    rows = []
    for workload, per in results.items():
        row: Dict[str, Any] = {"workload": workload}
        for config in CONFIGS:
            got = [v for v in per[config] if v is not None]
            if not got:
                continue
            pairs = [(v, b) for v, b in zip(per[config], per["none"]) if v is not None and b is not None]
            row[config] = {
                "cpu_us": statistics.median(v[0] for v in got), "wall_us": statistics.median(v[1] for v in got),
                "cpu_ratio": statistics.median(v[0] / b[0] for v, b in pairs) if pairs else None,
                "wall_ratio": statistics.median(v[1] / b[1] for v, b in pairs) if pairs else None,
                "added_cpu_us": statistics.median(v[0] - b[0] for v, b in pairs) if pairs else None,
            }
        rows.append(row)
    return rows


MEMORY = """\
import gc, json, os, resource, socket, sys, tracemalloc
kind, n, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "socket":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 200
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        n = min(n, hard - 200)
    make = socket.socket
else:
    import urllib3  # imported (and patched on enable) before the measurement
    make = urllib3.PoolManager
import connwatch
from connwatch import bootstrap, patches
# The agent's own files only: the installed package's folder (a checkout's path may itself
# contain "connwatch", and then would match urllib3's files in its venv).
pkg = os.path.join(os.path.dirname(os.path.realpath(connwatch.__file__)), "")
connwatch.enable(dir=folder, snapshot_interval=0)
cfg = bootstrap.config()
disabled = cfg.disabled_patches if cfg is not None else ()
def build(count):
    return [make() for _ in range(count)]  # one call site for every batch
def measure(on):  # (all bytes, the agent's files' bytes, live clients) for n clients, patches on/off
    if on:
        patches.install(disabled)
    else:
        patches.uninstall()
    warm = build(50)  # first use of the call site, lazy imports
    connwatch.snapshot()
    del warm
    gc.collect()
    before = tracemalloc.take_snapshot()
    clients = build(n)
    live = connwatch.snapshot().live  # applies queued events
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "filename")
    total = sum(s.size_diff for s in stats)
    ours = sum(s.size_diff for s in stats if os.path.realpath(s.traceback[0].filename).startswith(pkg))
    del clients
    gc.collect()
    return total, ours, live
tracemalloc.start()
off_total, _, _ = measure(False)
on_total, ours, live = measure(True)
print(json.dumps({"kind": kind, "n": n, "bytes_per_client": ours / n,
                  "net_bytes_per_client": (on_total - off_total) / n, "live": live}))
"""


def memory(n: int, config: str = "connwatch", kind: str = "socket") -> Dict[str, Any]:
    """Bytes the agent allocates per live tracked client, ``kind`` "socket" (as many live sockets
    as RLIMIT_NOFILE allows, up to n) or "pool" (n live ``urllib3.PoolManager()`` made by the app),
    in one interpreter with the agent running, after a warm-up of the call site:

    * net_bytes_per_client: every allocation (tracemalloc) with the patches installed, minus the
      same with them removed;
    * bytes_per_client: the allocations tracemalloc attributes to the agent's own files (the
      installed package's folder), in the JSON only: what the C path allocates is attributed to
      the app's line that called the wrapped constructor, and a Python wrapper's call of the
      original gets the original's own argument binding (PoolManager's ``**connection_pool_kw``
      dict, 64 bytes)."""
    folder = tempfile.mkdtemp(prefix="connwatch-bench-")
    try:
        env = {**_env(config, folder), "CONNWATCH_ENABLED": "0"}  # enabled by the script itself
        proc = subprocess.run([sys.executable, "-c", MEMORY, kind, str(n), folder], env=env, cwd=folder,
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            print(f"  [memory {config} {kind}] failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return {}
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def memories(n: int) -> Dict[str, Any]:
    """memory() for sockets and urllib3 PoolManagers, C and pure-Python paths, in one dict:
    n / bytes_per_client / net_bytes_per_client / live (sockets), pool_n / pool_bytes_per_client /
    pool_net_bytes_per_client / pool_live, and the same with a ``py_`` prefix (pure Python)."""
    out: Dict[str, Any] = {}
    for config, prefix in (("connwatch", ""), ("connwatch-py", "py_")):
        for kind, sub in (("socket", ""), ("pool", "pool_")):
            got = memory(n, config, kind)
            for key in ("n", "bytes_per_client", "net_bytes_per_client", "live"):
                if key in got:
                    out[f"{prefix}{sub}{key}"] = got[key]
    return out


def scale(reps: int) -> List[Dict[str, Any]]:
    """One snapshot and one metric collection at 10 / 1,000 / 10,000 call sites, and 10,000
    live clients over 10 sites (cost must follow sites, not clients)."""
    from connwatch import _registry, _snapshot
    from connwatch._callsite import CallSite

    try:
        from connwatch.exporters._readings import Collector
    except ImportError:  # pragma: no cover
        Collector = None  # type: ignore[assignment,misc]

    class Client:
        pass

    out = []
    for sites, clients in ((10, 10), (1000, 1000), (10000, 10000), (10, 10000)):
        _registry.clear()
        keep = []
        site_objs = [CallSite(f"/srv/app/mod{i % 97}.py", i, f"handler_{i}", False,
                              ((f"/srv/app/mod{i % 97}.py", i, f"handler_{i}"),)) for i in range(sites)]
        for j in range(clients):
            c = Client()
            keep.append(c)
            _registry.track(c, "requests.Session", site_objs[j % sites], upstream="127.0.0.1:8080")
        _registry.flush()
        t_snap, t_dump, t_coll = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            snap = _snapshot.take()
            t1 = time.perf_counter()
            snap.dumps()
            t2 = time.perf_counter()
            t_snap.append(t1 - t0)
            t_dump.append(t2 - t1)
            if Collector is not None:
                col = Collector(max_callsites=max(sites, 1000), max_age_s=0.0)
                t3 = time.perf_counter()
                col.reading()
                t_coll.append(time.perf_counter() - t3)
        out.append({"call_sites": sites, "live_clients": clients,
                    "snapshot_ms": statistics.median(t_snap) * 1e3,
                    "json_ms": statistics.median(t_dump) * 1e3,
                    "collection_ms": statistics.median(t_coll) * 1e3 if t_coll else None})
        del keep
    _registry.clear()
    return out


def _fleet_folder(folder: Path, files: int, sites: int, upstreams: int) -> None:
    """``files`` snapshot files (one per process) of ``sites`` call sites each, to ``upstreams`` upstreams."""
    from connwatch import _snapshot
    from connwatch._callsite import CallSite

    for pid in range(1, files + 1):
        stats = tuple(
            _snapshot.Statistic("requests.Session", None,
                                CallSite(f"/srv/app/mod{i % 50}.py", 10 + i, f"handler_{i}", False,
                                         ((f"/srv/app/mod{i % 50}.py", 10 + i, f"handler_{i}"),)),
                                live=1 + (pid + i) % 7, created=50, closed=40,
                                upstreams=((f"svc{i % upstreams}.internal:8080", 1 + (pid + i) % 7),))
            for i in range(sites))
        snap = _snapshot.Snapshot(stats, time.time(), pid, f"web-{pid % 40}", f"svc-{pid % 4}", fds_open=100,
                                  fds_limit=1024)
        snap.dump(str(folder / f"web-{pid}.json"))


def cli_scale(quick: bool) -> List[Dict[str, Any]]:
    """The CLI over folders of many processes' snapshot files: the whole command, as a user runs it."""
    out = []
    rows = [("report --by upstream --json", 1000, 20, 10)]
    for name, files, sites, ups in rows:
        if quick:
            files = 50
        with tempfile.TemporaryDirectory(prefix="connwatch-bench-") as tmp:
            folder = Path(tmp)
            _fleet_folder(folder, files, sites, ups)
            times = []
            for _ in range(1 if quick else 5):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "connwatch", *name.split()[:1], str(folder),
                                       *name.split()[1:]], capture_output=True, text=True, cwd="/",
                                      env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
                times.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise RuntimeError(f"connwatch {name} failed: {proc.stderr[-2000:]}")
        out.append({"command": f"connwatch {name}", "files": files, "call_sites_per_file": sites,
                    "seconds": statistics.median(times)})
    return out


def _canary_folder(folder: Path, processes: int, sites: int, rng: random.Random, leaks: int) -> None:
    """One group of a canary: ``processes`` snapshot files of ``sites`` call sites each, with the
    agent's leak and churn signals; the first ``leaks`` sites grow steadily (a slow leak)."""
    from connwatch import _leaks, _snapshot
    from connwatch._callsite import CallSite

    folder.mkdir()
    now = time.time()
    for pid in range(1, processes + 1):
        stats = []
        for i in range(sites):
            live = max(0, int(rng.gauss(5 + i % 20, 1.5)))
            leak = i < leaks
            growth = _leaks.Growth(leak, 90.0 + rng.random() * 10 if leak else rng.gauss(0.0, 0.5), 8, 80.0)
            churn = _leaks.Churn(False, 100.0 if leak else abs(rng.gauss(2.0, 1.0)), 12, 80.0, 40, 30.0, 0)
            stats.append(_snapshot.Statistic(
                "requests.Session", None,
                CallSite(f"/srv/app/mod{i % 97}.py", 10 + i, f"handler_{i}", False,
                         ((f"/srv/app/mod{i % 97}.py", 10 + i, f"handler_{i}"), ("/srv/app/main.py", 5, "main"))),
                live=live, created=live + 40, closed=40, upstreams=((f"svc{i % 10}.internal:8080", live),),
                growth=growth, churn=churn))
        snap = _snapshot.Snapshot(tuple(stats), now, pid, f"web-{pid % 40}", "api", started=now - 3600.0,
                                  fds_open=200 + rng.randint(0, 20), fds_limit=65536)
        snap.dump(str(folder / f"web-{pid}.json"))


def canary_scale(quick: bool) -> Dict[str, Any]:
    """``connwatch canary`` over two groups of 200 processes x 1,000 call sites (3 leaking in the
    canary): the judge alone (readings in memory), loading the 400 files plus the judge in one
    process, and the whole command as a user runs it."""
    from connwatch import _canary
    from connwatch.cli.canary import load_folder

    processes, sites = (20, 100) if quick else (200, 1000)
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="connwatch-bench-") as tmp:
        base, can = Path(tmp) / "baseline", Path(tmp) / "canary"
        _canary_folder(base, processes, sites, rng, 0)
        _canary_folder(can, processes, sites, rng, 3)
        mb = sum(f.stat().st_size for f in Path(tmp).glob("*/*.json")) / 1e6
        t_judge, t_load, t_cmd = [], [], []
        for _ in range(1 if quick else 3):
            t0 = time.perf_counter()
            b, _skipped, _err = load_folder(str(base))
            c, _skipped, _err = load_folder(str(can))
            t1 = time.perf_counter()
            result = _canary.judge(b, c)
            t2 = time.perf_counter()
            t_load.append(t2 - t0)
            t_judge.append(t2 - t1)
            if result["verdict"] != "fail" or result["counts"]["fail"] != 3:
                raise RuntimeError(f"canary judge: expected 3 failing sites, got {result['counts']}")
            t3 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "connwatch", "canary", str(base), str(can), "--json"],
                                  capture_output=True, text=True, cwd="/",
                                  env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
            t_cmd.append(time.perf_counter() - t3)
            if proc.returncode != 1:
                raise RuntimeError(f"connwatch canary: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return {"processes_per_group": processes, "call_sites": sites, "megabytes": round(mb, 1),
            "judge_s": statistics.median(t_judge), "load_and_judge_s": statistics.median(t_load),
            "command_s": statistics.median(t_cmd)}


PTH = (REPO / "connwatch" / "connwatch.pth").read_text().strip()
# The installed package (with the compiled extension), not the checkout.
PKG = Path(subprocess.run([sys.executable, "-c", "import connwatch, os; print(os.path.dirname(connwatch.__file__))"],
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/",
                          capture_output=True, text=True, check=True).stdout.strip())


def _venv(path: Path, with_agent: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if with_agent:
        shutil.copytree(PKG, Path(site) / "connwatch",
                        ignore=shutil.ignore_patterns("__pycache__", "connwatch.pth"))
        (Path(site) / "connwatch.pth").write_text(PTH + "\n")
        subprocess.run([str(py), "-m", "compileall", "-q", str(Path(site) / "connwatch")], check=True)
    return py


def startup(runs: int) -> Dict[str, Any]:
    """Interpreter start: not installed, installed and off, installed and on (wall, median)."""
    tmp = Path(tempfile.mkdtemp(prefix="connwatch-bench-"))
    try:
        plain = _venv(tmp / "plain", False)
        agent = _venv(tmp / "agent", True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CONNWATCH_", "OTEL_", "PYTHON"))}
        cases = {
            "not installed": (plain, base),
            "installed, off": (agent, base),
            "installed, on": (agent, {**base, "CONNWATCH_ENABLED": "1", "CONNWATCH_DIR": str(tmp / "s"),
                                      "CONNWATCH_SNAPSHOT_INTERVAL": "0"}),
        }
        times: Dict[str, List[float]] = {k: [] for k in cases}
        for _ in range(runs):
            for name, (py, env) in cases.items():
                t0 = time.perf_counter()
                subprocess.run([str(py), "-c", "pass"], env=env, check=True)
                times[name].append(time.perf_counter() - t0)
        res: Dict[str, Any] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        # The hook line itself, when off: exec'd by site for every interpreter.
        import timeit

        res["pth line, off (us)"] = min(timeit.repeat(PTH, setup="import os", number=20000, repeat=5)) / 20000 * 1e6
        # Main-thread cost of starting the agent, with the OTLP exporter configured: the SDK
        # import must happen on the exporter's thread, not here.
        # Which thread imports the SDK is recorded by a meta-path finder (checking sys.modules after
        # start would race with the exporter thread's own import).
        code = ("import sys, threading, time\n"
                "seen = []\n"
                "class Spy:\n"
                "    def find_spec(self, name, path=None, target=None):\n"
                "        if name == 'opentelemetry.sdk.metrics': seen.append(threading.current_thread().name)\n"
                "sys.meta_path.insert(0, Spy())\n"
                "t = time.perf_counter(); import connwatch.bootstrap as b\n"
                "b.start(exporter='otlp', snapshot_interval=0, dir=sys.argv[1])\n"
                "d = time.perf_counter() - t\n"
                "from connwatch import exporters; exporters.wait_ready(20)\n"
                "print(d * 1e3, 'MainThread' in seen)")
        env = {**base, "PYTHONPATH": str(PKG.parent), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        main_ms = []
        sdk_on_main = False
        for _ in range(max(3, runs // 3)):
            proc = subprocess.run([sys.executable, "-S", "-c", code, str(tmp / "s2")], env=env,
                                  capture_output=True, text=True, timeout=60)
            ms, sdk = proc.stdout.split()
            main_ms.append(float(ms))
            sdk_on_main = sdk_on_main or sdk == "True"
        res["agent on + otlp, main-thread start (ms)"] = statistics.median(main_ms)
        res["SDK imported on the main thread during start"] = sdk_on_main
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"CPython {platform.python_version()}, {platform.system()} {platform.release()}, "
            f"{os.cpu_count()} vCPU ({cpu}); connwatch C hot path: {'yes' if accelerated() else 'NO (pure Python)'}")


def markdown(over: List[Dict[str, Any]], tog: List[Dict[str, Any]], instr: List[Dict[str, Any]],
             mem: Dict[str, Any], sc: List[Dict[str, Any]], st: Dict[str, Any],
             cli: Optional[List[Dict[str, Any]]] = None, canary: Optional[Dict[str, Any]] = None) -> str:
    lines = [f"Measured on: {machine()}, {time.strftime('%Y-%m-%d')}", "",
             "Per operation: CPU time of the measured process (user+system), median of per-run medians; "
             "ratios (CPU / wall clock) and added time are medians of each round's paired comparison with the "
             "no-agent run of that round (same hash seed).", "",
             "| workload | no agent | connwatch | connwatch, pure Python | tracemalloc=16 | OpenTelemetry |",
             "|---|---|---|---|---|---|"]
    for row in over:
        cells = []
        for c in CONFIGS:
            v = row.get(c)
            if not v:
                cells.append("n/a")
            elif c == "none":
                cells.append(f"{v['cpu_us']:.2f} µs (wall {v['wall_us']:.2f})")
            else:
                cells.append(f"{v['cpu_us']:.2f} µs, x{v['cpu_ratio']:.3f} / x{v['wall_ratio']:.3f} "
                             f"({v['added_cpu_us']:+.2f} µs)")
        lines.append(f"| {row['workload']} | " + " | ".join(cells) + " |")
    lines += ["", "Each tool's own cost on the calling thread, in one interpreter per row and tool: the tool is "
              "switched on and off between batches of K operations (a batch lasts about 1 ms or more), in random "
              "order per pair of batches, and each cell is the median of the per-pair differences of the calling "
              "thread's CPU time per operation, as a ratio to the tool-off time with a bootstrap 95% interval "
              "[low, high] and in µs added per operation. The A/A control switches nothing: its interval is "
              "the method's resolution.", "",
              "| workload | tool off (µs per op, thread CPU) | A/A control | connwatch | connwatch, pure Python "
              "| tracemalloc=16 | OpenTelemetry |", "|---|---|---|---|---|---|---|"]
    for row in tog:
        base = row.get("connwatch", {}).get("off_us")
        cells = [f"{base:.2f} µs" if base is not None else "n/a"]
        for c in CONFIGS:
            v = row.get(c)
            cells.append(f"x{v['ratio']:.3f} [{v['ratio_lo']:.3f}, {v['ratio_hi']:.3f}] ({v['added_us']:+.2f} µs)"
                         if v else "n/a")
        lines.append(f"| {row['workload']} | " + " | ".join(cells) + " |")
    if instr:
        lines += ["", "User-space instructions per operation (cachegrind, difference of a short and a long run):", "",
                  "| workload | no agent | connwatch | connwatch, pure Python |", "|---|---|---|---|"]
        for row in instr:
            base = row.get("none")
            cells = [f"{base:,.0f}" if base else "n/a"]
            for c in AGENTS:
                v = row.get(c)
                cells.append(f"{v:,.0f}, x{v / base:.3f} ({v - base:+,.0f})" if v and base else "n/a")
            lines.append(f"| {row['workload']} | " + " | ".join(cells) + " |")

    def per(key: str) -> str:
        v = mem.get(key)
        return f"{v:,.0f}" if isinstance(v, (int, float)) else "n/a"

    def count(key: str) -> str:
        v = mem.get(key)
        return f"{v:,}" if isinstance(v, int) else "n/a"

    lines += ["", "Memory per live tracked client (tracemalloc, every allocation with the agent's patches on minus "
              f"off): {per('net_bytes_per_client')} bytes per socket ({count('n')} live sockets), "
              f"{per('pool_net_bytes_per_client')} bytes per urllib3.PoolManager ({count('pool_n')} live); "
              f"pure Python: {per('py_net_bytes_per_client')} bytes per socket ({count('py_n')} live sockets), "
              f"{per('py_pool_net_bytes_per_client')} bytes per urllib3.PoolManager ({count('py_pool_n')} live).",
              "",
              "| call sites | live clients | snapshot | JSON | metric collection |", "|---|---|---|---|---|"]
    for r in sc:
        coll = f"{r['collection_ms']:.3f} ms" if r["collection_ms"] is not None else "n/a"
        lines.append(f"| {r['call_sites']:,} | {r['live_clients']:,} | {r['snapshot_ms']:.3f} ms | "
                     f"{r['json_ms']:.3f} ms | {coll} |")
    if cli:
        lines += ["", "| command (whole process, median of 5) | snapshot files | call sites per file | time |",
                  "|---|---|---|---|"]
        for r in cli:
            lines.append(f"| `{r['command']}` | {r['files']:,} | {r['call_sites_per_file']:,} | {r['seconds']:.2f} s |")
    if canary:
        lines += ["", "| canary judge (median of 3) | processes per group | call sites | snapshot files | judge | "
                  "load + judge | `connwatch canary B C --json` |", "|---|---|---|---|---|---|---|",
                  f"| two groups, 3 slow leaks | {canary['processes_per_group']:,} | {canary['call_sites']:,} | "
                  f"{2 * canary['processes_per_group']:,} ({canary['megabytes']:.0f} MB) | {canary['judge_s']:.2f} s | "
                  f"{canary['load_and_judge_s']:.2f} s | {canary['command_s']:.2f} s |"]
    lines += ["", "| start-up | value |", "|---|---|"]
    for k, v in st.items():
        lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: shows it still runs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    print(f"connwatch benchmarks on {machine()}", file=sys.stderr)
    over = overhead(rounds, args.quick)
    tog = toggled(args.quick)
    instr = [] if args.quick else instructions()
    mem = memories(2000 if args.quick else 100_000)
    sc = scale(3 if args.quick else 15)
    st = startup(5 if args.quick else 41)
    cli = cli_scale(args.quick)
    can = canary_scale(args.quick)
    import html_report  # benchmarks/html_report.py: the HTML report at 1,000 call sites

    html = html_report.html_scale(args.quick)
    if args.json:
        print(json.dumps({"machine": machine(), "overhead": over, "toggled": tog, "instructions": instr,
                          "memory": mem, "scale": sc, "startup": st, "cli": cli, "canary": can, "html": html},
                         indent=1))
    else:
        print(markdown(over, tog, instr, mem, sc, st, cli, can) + "\n\n" + "\n".join(html_report.markdown(html)))


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
