"""Per-socket overhead of the agent, side by side in one process run.

Alternates rounds with the agent off and on (enable/disable patch and unpatch the same
process) and reports the median time per operation and the ratio on/off:

  1. socket() + close()
  2. loopback TCP connect + close (against a listener in this process, opened before)
  3. the same as 1 at a deep (~40 frame) user stack

    python benchmarks/socket_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import connwatch


def bench_socket(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        socket.socket().close()
    return (time.perf_counter() - t0) / n


def make_connect(addr: tuple, srv: socket.socket) -> Callable[[int], float]:
    def bench_connect(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            c = socket.create_connection(addr)
            conn, _ = srv.accept()
            c.close()
            conn.close()
        return (time.perf_counter() - t0) / n
    return bench_connect


def deep(depth: int, fn: Callable[[int], float], n: int) -> float:
    return deep(depth - 1, fn, n) if depth else fn(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds (CI smoke run)")
    args = parser.parse_args()
    rounds, n_sock, n_conn = (3, 2000, 300) if args.quick else (11, 20000, 3000)
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    addr = srv.getsockname()
    work: Dict[str, Callable[[int], float]] = {
        "socket()+close": bench_socket,
        "loopback connect+close (client and accepted)": make_connect(addr, srv),
        "socket()+close at 40-frame stack": lambda n: deep(40, bench_socket, n),
    }
    sizes = {"socket()+close": n_sock, "loopback connect+close (client and accepted)": n_conn,
             "socket()+close at 40-frame stack": n_sock}
    results: Dict[str, Dict[str, List[float]]] = {k: {"off": [], "on": []} for k in work}
    folder = tempfile.mkdtemp()
    for _ in range(rounds):
        for mode in ("off", "on"):
            if mode == "on":
                connwatch.enable(dir=folder, snapshot_interval=0)
            for name, fn in work.items():
                fn(max(10, sizes[name] // 10))  # warm-up
                results[name][mode].append(fn(sizes[name]))
            if mode == "on":
                connwatch.disable()
    print(f"{'workload':<48} {'off us':>9} {'on us':>9} {'+us':>7} {'ratio':>7}")
    for name, r in results.items():
        off, on = statistics.median(r["off"]) * 1e6, statistics.median(r["on"]) * 1e6
        print(f"{name:<48} {off:>9.2f} {on:>9.2f} {on - off:>7.2f} {on / off:>7.3f}")
    srv.close()


if __name__ == "__main__":
    main()
