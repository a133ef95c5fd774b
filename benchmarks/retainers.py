"""What a retainer search costs: ``connwatch.snapshot(retainers=True)`` on an app-like heap.

    python benchmarks/retainers.py [--objects N] [--rounds R] [--quick] [--json]

Builds a heap of about N tracked objects besides the interpreter's own (records: an instance
with a list and a dict each, in a module-level dict), opens real loopback connections, and
times one snapshot with retainers for a client held

  shallow    in a module-level list (found at depth 1)
  deep       inside the last record (found after most of the heap)
  hidden     only where the search never looks (a connwatch module): the whole heap is walked
  bound      hidden, on a heap ten times larger: the search stops at its bound

next to a plain snapshot. Times are the median over rounds (wall and CPU of this process);
``visited`` is the objects the search reached. This is a benchmark, not a test: nothing here
asserts a time; --quick only shows it still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parent.parent


class Record:
    def __init__(self, i: int) -> None:
        self.id = i
        self.name = f"user-{i}"
        self.tags = [i, i + 1]
        self.meta = {"k": i}


STORE: Dict[int, Record] = {}
SHALLOW: List[socket.socket] = []


def build(n: int) -> None:
    """About ``n`` tracked objects: n/2 records of two each (the instance and its list; the
    dict holds only numbers: the collector does not track it)."""
    STORE.clear()
    for i in range(max(1, n // 2)):
        STORE[i] = Record(i)


def listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def accept() -> None:
        conns = []
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return srv


def time_it(fn: Any, rounds: int) -> Dict[str, Any]:
    walls, cpus, last = [], [], None
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        last = fn()
        cpus.append((time.process_time() - c) * 1000.0)
        walls.append((time.perf_counter() - w) * 1000.0)
    out: Dict[str, Any] = {"wall_ms": round(statistics.median(walls), 1), "cpu_ms": round(statistics.median(cpus), 1)}
    # Peak memory the call allocates (one more run under tracemalloc, not timed).
    import tracemalloc

    tracemalloc.start()
    fn()
    out["peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    if isinstance(last, dict):
        out.update(last)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=100_000, help="tracked objects of the app heap (100,000)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="a small heap and 2 rounds: shows it runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.objects, args.rounds = 3000, 2
    sys.path.insert(0, str(REPO))
    import connwatch
    from connwatch import _registry

    connwatch.enable(snapshot_interval=0)
    srv = listener()
    port = srv.getsockname()[1]
    base_objects = len(gc.get_objects())
    build(args.objects)
    heap = len(gc.get_objects())

    case = [""]

    def search() -> Dict[str, Any]:
        snap = connwatch.snapshot(retainers=True)
        info = dict(snap.extra["retainers_search"])
        info["paths"] = [p for s in snap.stats if s.site is not None and s.site.function.split(".")[-1] == case[0]
                         for p in s.retainers or ()][:1]
        return {k: info[k] for k in ("visited", "found", "truncated", "limit", "paths")}

    connwatch.snapshot()  # the first one imports json and dataclasses
    rows: Dict[str, Dict[str, Any]] = {}
    rows["plain snapshot"] = time_it(lambda: connwatch.snapshot() and None, args.rounds)

    def shallow() -> None:
        SHALLOW.append(socket.create_connection(("127.0.0.1", port)))

    shallow()
    case[0] = "shallow"
    rows["shallow"] = time_it(search, args.rounds)
    SHALLOW.pop().close()

    def deep() -> None:
        STORE[len(STORE) - 1].meta["conn"] = socket.create_connection(("127.0.0.1", port))

    deep()
    case[0] = "deep"
    rows["deep"] = time_it(search, args.rounds)
    STORE[len(STORE) - 1].meta.pop("conn").close()

    def hidden() -> None:
        _registry.__dict__["_bench_hidden"] = socket.create_connection(("127.0.0.1", port))

    hidden()
    case[0] = "hidden"
    rows["hidden"] = time_it(search, args.rounds)
    build(args.objects * 10)
    big = len(gc.get_objects())
    rows["bound"] = time_it(search, max(1, args.rounds // 2))
    _registry.__dict__.pop("_bench_hidden").close()
    srv.close()
    result = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "accelerated": _registry.ACCELERATED, "interpreter_objects": base_objects,
        "heap_objects": heap, "bound_heap_objects": big, "rounds": args.rounds, "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"retainer search, Python {result['python']} ({'C' if result['accelerated'] else 'pure Python'} "
          f"registry), heap {heap:,} tracked objects ({base_objects:,} the interpreter's), "
          f"median of {args.rounds} rounds")
    print(f"  {'case':<16} {'wall ms':>8} {'cpu ms':>8} {'peak MiB':>9} {'visited':>9}  result")
    for name, r in rows.items():
        if "visited" not in r:
            print(f"  {name:<16} {r['wall_ms']:>8} {r['cpu_ms']:>8} {r['peak_mib']:>9} {'-':>9}")
            continue
        none = "no path (as expected)" if name in ("hidden", "bound") else "not found"
        what = f"stopped at its bound ({r['limit']})" if r["truncated"] else r["paths"][0] if r["paths"] else none
        heap_note = f" (heap {big:,})" if name == "bound" else ""
        print(f"  {name:<16} {r['wall_ms']:>8} {r['cpu_ms']:>8} {r['peak_mib']:>9} {r['visited']:>9,}  "
              f"{what}{heap_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
