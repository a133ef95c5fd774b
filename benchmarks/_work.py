"""One benchmark measurement in a fresh interpreter (run by benchmarks/run.py).

    python [-X tracemalloc=16 -W always::ResourceWarning] benchmarks/_work.py CONFIG WORKLOAD N TARGET

CONFIG is how this interpreter was started (``none``, ``connwatch``, ``tracemalloc``,
``otel``); for ``otel`` this process installs the OpenTelemetry requests/urllib3/grpc
instrumentation with an SDK TracerProvider (spans recorded, not exported). Prints the median
microseconds per operation over a few batches of N/5 operations (the uvloop workload runs
``UVLOOP_PER_RUN`` connections per loop run, see there), after a warm-up, twice:
this process's CPU time (user + system: what the agent costs the app, without the server's
share and the scheduler's noise) and wall time.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from typing import Callable, List

DEPTH = 40
# Connections per loop run in the uvloop workload: each run_until_complete() of a uvloop loop on
# the main thread makes and closes a socketpair (its signal wake-up), which is not the workload.
UVLOOP_PER_RUN = 10


def per_call(workload: str) -> int:
    """Operations one call of ``make_op(workload)`` performs (times are reported per operation)."""
    return UVLOOP_PER_RUN if workload.startswith("uvloop") else 1


def deep(depth: int, fn: Callable[[], None]) -> None:
    if depth:
        deep(depth - 1, fn)
    else:
        fn()


def make_op(workload: str, target: str) -> Callable[[], None]:
    """One operation of ``workload`` against the server at ``target`` (host:port)."""
    host, _, port = target.rpartition(":")
    addr = (host, int(port))
    op: Callable[[], None]
    if workload.startswith("socket"):
        def op() -> None:
            socket.socket().close()
    elif workload.startswith("connect"):
        def op() -> None:
            socket.create_connection(addr).close()
    elif workload.startswith("uvloop"):  # open_connection + close on a uvloop loop (libuv's socket)
        import asyncio

        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)

        async def connect_close() -> None:
            for _ in range(UVLOOP_PER_RUN):
                _reader, writer = await asyncio.open_connection(host, int(port))
                writer.close()
                await writer.wait_closed()

        def op() -> None:
            loop.run_until_complete(connect_close())
    elif workload.startswith("requests.Session"):  # the agent's whole work on a requests call
        import requests

        def op() -> None:
            requests.Session().close()
    elif workload.startswith("grpc channel create"):  # the agent's whole work on a grpc channel
        import grpc

        def op() -> None:
            grpc.insecure_channel(target).close()
    elif workload.startswith("requests"):
        import requests

        url = f"http://{target}/bench"

        def op() -> None:
            _ = requests.get(url, timeout=10).content
    elif workload.startswith("grpc"):
        import grpc

        def op() -> None:
            ch = grpc.insecure_channel(target)
            call = ch.unary_unary("/echo.Echo/Call")
            call(b"x", timeout=10)
            ch.close()
    else:
        raise SystemExit(f"unknown workload {workload}")
    return op


def main() -> None:
    config, workload, n, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if config == "otel":
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
        RequestsInstrumentor().instrument()
        URLLib3Instrumentor().instrument()
        GrpcInstrumentorClient().instrument()
    op = make_op(workload, target)
    deep_stack = workload.endswith("@40")
    per = per_call(workload)
    batch = max(1, n // 5 // per)

    def run(count: int) -> tuple[float, float]:
        def loop() -> None:
            for _ in range(count):
                op()
        c0, t0 = time.process_time(), time.perf_counter()
        if deep_stack:
            deep(DEPTH, loop)
        else:
            loop()
        return (time.process_time() - c0) / (count * per), (time.perf_counter() - t0) / (count * per)

    run(max(1, batch // 2))  # warm-up: imports, caches, first call sites
    samples: List[tuple[float, float]] = [run(batch) for _ in range(5)]
    cpu = statistics.median(s[0] for s in samples)
    wall = statistics.median(s[1] for s in samples)
    print(f"{cpu * 1e6:.4f} {wall * 1e6:.4f}")


if __name__ == "__main__":
    main()
