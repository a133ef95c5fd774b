"""One tool switched on and off between operations of one workload, in one interpreter
(run by benchmarks/run.py).

    python benchmarks/_toggle.py CONFIG WORKLOAD PAIRS K TARGET FOLDER

Fresh interpreters differ from each other by more than the agent costs on the HTTP and grpc
workloads (memory layout, hash seeds, grpc's polling threads: 5-10% from run to run here).
This measures the tool's cost on the thread that makes the calls without that noise: the
workload runs in one interpreter, in ``PAIRS`` pairs of batches of ``K`` operations, one batch
with the tool on and one with it off, in a random order per pair, and the result is the median
of the per-pair differences (with a bootstrap 95% interval). Switching happens between batches
and is not timed; after each switch a tenth of a batch (at least one operation) runs untimed, so
that the interpreter's inline caches (reset when a class attribute changes) and the CPU's caches
settle.

CONFIG and what "on" and "off" are:

  none          nothing changes: the A/A control, whose spread is the method's resolution
  connwatch     the agent runs throughout (registry, writer thread); on/off puts its wrappers on
                the library classes and takes them off (the same objects each time), i.e.
                everything it does on the app's threads. CONNWATCH_PURE_PYTHON=1 in the
                environment: the Python path
  tracemalloc   ``tracemalloc.start(16)`` / ``tracemalloc.stop()``, ResourceWarning always shown
  otel          the OpenTelemetry requests/urllib3/grpc instrumentation's ``instrument()`` /
                ``uninstrument()``, SDK TracerProvider (spans recorded, not exported)

Prints one JSON object: per-operation medians off and on (thread CPU and wall), the added CPU
time per operation with its interval, and the ratios.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Tuple

from _work import DEPTH, deep, make_op, per_call

Switch = Tuple[Callable[[], None], Callable[[], None]]


def switches(config: str, folder: str) -> Switch:
    """(turn on, turn off) for ``config``."""
    if config == "none":
        return (lambda: None), (lambda: None)
    if config.startswith("connwatch"):
        import connwatch

        # The agent runs throughout; switching puts its wrappers on the library classes or takes
        # them off (the same wrapper objects every time, as the agent leaves them: reinstalling
        # the patches would make new ones and cost the next few operations more than the agent).
        before = _class_dicts()
        connwatch.enable(dir=folder)
        after = _class_dicts()
        swaps = [(owner, attr, before[owner].get(attr, _MISSING), value)
                 for owner, attrs in after.items() for attr, value in attrs.items()
                 if before[owner].get(attr, _MISSING) is not value]

        state = [True]

        def put(on: bool) -> None:
            if state[0] == on:
                return
            state[0] = on
            for owner, attr, original, wrapper in swaps:
                if on:
                    setattr(owner, attr, wrapper)
                elif original is _MISSING:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)

        return (lambda: put(True)), (lambda: put(False))
    if config == "tracemalloc":
        import tracemalloc

        warnings.simplefilter("always", ResourceWarning)
        return (lambda: tracemalloc.start(16)), tracemalloc.stop
    if config == "otel":
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
        tools = (RequestsInstrumentor(), URLLib3Instrumentor(), GrpcInstrumentorClient())

        def on() -> None:
            for t in tools:
                t.instrument()

        def off() -> None:
            for t in tools:
                t.uninstrument()

        return on, off
    raise SystemExit(f"unknown config {config}")


_MISSING = object()
# Where the agent puts its wrappers for the benchmark's workloads (imported by make_op first).
_PATCHED_MODULES = ("socket", "requests.sessions", "urllib3.poolmanager", "urllib3.connectionpool", "grpc._channel",
                    "uvloop")


def _class_dicts() -> Dict[Any, Dict[str, Any]]:
    """The attributes of every class (and the module itself) in the patched modules loaded."""
    out: Dict[Any, Dict[str, Any]] = {}
    for name in _PATCHED_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        out[module] = dict(vars(module))
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name:
                out[value] = dict(vars(value))
    return out


def median_ci(values: List[float], resamples: int = 400, seed: int = 1) -> Tuple[float, float]:
    """A bootstrap 95% interval of the median of ``values``."""
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def main() -> None:
    config, workload, pairs, k, target, folder = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                  sys.argv[5], sys.argv[6])
    op = make_op(workload, target)
    op()  # imports everything the workload uses (grpc loads grpc._channel at its first channel)
    on, off = switches(config, folder)
    deep_stack = workload.endswith("@40")
    thread_ns, wall_ns = time.thread_time_ns, time.perf_counter_ns

    per = per_call(workload)  # operations per call of op (K counts calls)
    settle = max(1, k // 10)

    def batch() -> Tuple[float, float]:
        for _ in range(settle):  # untimed: caches settle after the switch
            op()
        out: List[int] = []

        def loop() -> None:
            c0, t0 = thread_ns(), wall_ns()
            for _ in range(k):
                op()
            out.extend((thread_ns() - c0, wall_ns() - t0))

        if deep_stack:
            deep(DEPTH, loop)
        else:
            loop()
        return out[0] / (k * per) / 1e3, out[1] / (k * per) / 1e3

    for _ in range(max(2, pairs // 20)):  # warm-up, both ways
        on()
        batch()
        off()
        batch()
    rng = random.Random(7)
    res: Dict[str, List[Tuple[float, float]]] = {"on": [], "off": []}
    for _ in range(pairs):
        for mode in (("on", "off") if rng.random() < 0.5 else ("off", "on")):
            (on if mode == "on" else off)()
            res[mode].append(batch())
    off()
    added = [a[0] - b[0] for a, b in zip(res["on"], res["off"])]
    added_wall = [a[1] - b[1] for a, b in zip(res["on"], res["off"])]
    base = statistics.median(v[0] for v in res["off"])
    base_wall = statistics.median(v[1] for v in res["off"])
    lo, hi = median_ci(added)
    out: Dict[str, Any] = {
        "pairs": pairs, "ops_per_batch": k,
        "off_us": base, "on_us": statistics.median(v[0] for v in res["on"]),
        "off_wall_us": base_wall, "on_wall_us": statistics.median(v[1] for v in res["on"]),
        "added_us": statistics.median(added), "added_lo_us": lo, "added_hi_us": hi,
        "added_wall_us": statistics.median(added_wall),
    }
    out["ratio"] = 1 + out["added_us"] / base
    out["ratio_lo"], out["ratio_hi"] = 1 + lo / base, 1 + hi / base
    out["wall_ratio"] = 1 + out["added_wall_us"] / base_wall
    print(json.dumps(out))


if __name__ == "__main__":
    main()
