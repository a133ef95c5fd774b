"""Exporters: where snapshots and metrics go (snapshot files, OTLP, Prometheus, console).

``start(config)`` is called by the bootstrap on the app's thread: it returns at once, and the
``connwatch-exporter`` daemon thread imports the OpenTelemetry SDK (60-130 ms), builds the
pipelines and then exports every ``OTEL_METRIC_EXPORT_INTERVAL``. ``stop()`` and
``after_fork_child()`` are always safe to call and bounded in time.

What the exporters create is never counted: every thread that does their work has a frame in
this package at the bottom of its stack (the call-site walk classifies it as the agent's), and
those threads are also registered with ``_callsite.register_agent_thread``.
"""

from __future__ import annotations

import os
import threading

from .. import _callsite, _log, _threads

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, List, Optional, Set, Tuple

    from . import _readings

THREAD_NAME = "connwatch-exporter"
STOP_TIMEOUT_S = 2.0  # the longest stop() (and so the app's exit) waits for a final export
# A forked child's exporter thread starts inside the at-fork hooks, before hooks registered
# after ours have run (the SDK's and grpc's, which re-create their locks and threads; logging's
# runs first since the bootstrap imports logging before registering): it waits this long first.
FORK_SETTLE_S = 0.1
_SDK_THREAD_MODULES = ("opentelemetry", "grpc", "connwatch")

_lock = threading.RLock()


class _Run:
    """One started set of exporters (replaced whole on restart)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.pipelines: List[Any] = []
        self.prometheus: Any = None
        from . import _readings  # with an exporter configured only: typing, dataclasses

        self.collector = _readings.Collector(getattr(config, "max_callsites", 1000))
        self.idents: Set[int] = set()
        self.pid = os.getpid()
        self.forked = False


_run: Optional[_Run] = None
# Pipelines inherited over a fork: kept referenced (never collected, never closed) in the
# child, because closing a grpc channel or HTTP session there would act on the parent's state.
_orphans: List[Any] = []


def start(config: Any) -> None:
    """Start the configured exporters in the background; returns at once, never raises."""
    global _run
    try:
        from . import spans

        spans.install(bool(getattr(config, "span_events", True)))
        with _lock:
            if _run is not None:
                return
            names = tuple(n for n in getattr(config, "exporters", ()) if n != "none")
            if not names:
                return
            run = _Run(config)
            _run = run
            _spawn(run, names)
    except Exception:
        _log.internal_error("exporter start")


def _spawn(run: _Run, names: Tuple[str, ...]) -> None:
    t = threading.Thread(target=_main, args=(run, names), name=THREAD_NAME, daemon=True)
    run.thread = t
    t.start()
    if t.ident is not None:
        run.idents.add(t.ident)
        _callsite.register_agent_thread(t.ident)


def _main(run: _Run, names: Tuple[str, ...]) -> None:
    """The exporter thread: imports and set-up, then the export loop, then a final export."""
    try:
        _work(run, names)
    finally:
        _threads.before_exit(run.thread)  # threading patched by gevent since we started


# grpc's C core aborts the whole process (SIGABRT in pollset_global_init) when it cannot get
# an eventfd at its first use: the exporter is not set up while descriptors are this scarce
# (and otlp.py skips exports likewise).
MIN_FREE_FDS = 64


def _wait_for_descriptors(run: _Run) -> bool:
    """Wait until the process has MIN_FREE_FDS descriptors free (or stop); warns once."""
    from .. import _fds

    while not _fds.has_headroom(MIN_FREE_FDS):
        _log.warn_once("exporter-fds", "fewer than %d file descriptors free: the metric exporter waits",
                       MIN_FREE_FDS)
        if run.stop.wait(1.0):
            return False
    return True


def _work(run: _Run, names: Tuple[str, ...]) -> None:
    try:
        _callsite.register_agent_thread()
        run.idents.add(threading.get_ident())
        if run.forked and run.stop.wait(FORK_SETTLE_S):
            return
        if not _wait_for_descriptors(run):
            return
        before = set(threading.enumerate())
        from .. import _forksafe

        with _forksafe.import_guard():  # the SDK imports: a fork waits for them (see _forksafe)
            _setup(run, names)
        _register_new_threads(run, before)
    except Exception:
        # An app that exits while we still import (grpc registers atexit hooks at import)
        # is not an error worth a traceback.
        if not run.stop.is_set():
            _log.internal_error("exporter set-up")
    finally:
        run.ready.set()
    if run.stop.is_set() and run.prometheus is not None:
        run.prometheus.stop()  # stop() ran while we were still setting up
    if not run.pipelines:
        return
    from .otlp import interval_s

    interval = interval_s()
    timeout = min(interval, 30.0)
    while not run.stop.wait(interval):
        if run.pid != os.getpid():  # pragma: no cover - a forked copy never runs this thread
            return
        before = set(threading.enumerate())
        for pipe in run.pipelines:
            pipe.export(timeout)
        _register_new_threads(run, before)
    # stop(): one final export (bounded by stop()'s join), then close.
    for pipe in run.pipelines:
        pipe.shutdown(STOP_TIMEOUT_S)


def _setup(run: _Run, names: Tuple[str, ...]) -> None:
    cfg = run.config
    for name in names:
        if run.stop.is_set():
            return
        if name == "prometheus":
            from .prometheus import PrometheusServer

            server = PrometheusServer(run.collector, getattr(cfg, "prometheus_host", "127.0.0.1"),
                                      int(getattr(cfg, "prometheus_port", 9464)))
            t = server.start()
            if t is not None and t.ident is not None:
                run.idents.add(t.ident)
                _callsite.register_agent_thread(t.ident)
                run.prometheus = server
            continue
        if name not in ("otlp", "console"):
            _log.warn_once("exporter:" + name, "unknown exporter %r; ignored", name)
            continue
        try:
            from . import otlp
        except ImportError as e:
            _missing(name, e)
            continue
        try:
            if otlp.sdk_disabled():
                _log.warn_once("otel-disabled", "OTEL_SDK_DISABLED=true: %s metric export is off", name)
                continue
            run.pipelines.append(otlp.Pipeline(name, run.collector, getattr(cfg, "service", None), run.idents))
        except ImportError as e:
            _missing(name, e)


def _missing(name: str, e: ImportError) -> None:
    _log.warn_once("exporter-missing:" + name, "the %s exporter needs the OpenTelemetry SDK and OTLP exporter, "
                   "which are connwatch's dependencies: reinstall it (pip install --force-reinstall connwatch): %s",
                   name, e)


def _register_new_threads(run: _Run, before: Set[threading.Thread]) -> None:
    """Mark threads the SDK or grpc started during our work as the agent's own."""
    for t in threading.enumerate():
        if t in before or t.ident is None or t.ident in run.idents:
            continue
        target = getattr(t, "_target", None)
        module = getattr(target, "__module__", None) or ""
        if module.startswith(_SDK_THREAD_MODULES) or t.name.startswith(("Otel", "connwatch")):
            run.idents.add(t.ident)
            _callsite.register_agent_thread(t.ident)


def stop() -> None:
    """Flush and stop the metric exporters (waits at most STOP_TIMEOUT_S); never raises."""
    global _run
    try:
        from . import spans

        spans.uninstall()
        with _lock:
            run, _run = _run, None
        if run is None:
            return
        run.stop.set()
        if run.thread is not None and run.thread is not threading.current_thread():
            run.thread.join(STOP_TIMEOUT_S)
        if run.prometheus is not None:
            run.prometheus.stop()
        for ident in run.idents:
            _callsite.unregister_agent_thread(ident)
    except Exception:
        _log.internal_error("exporter stop")


def after_fork_child() -> None:
    """Restart exporters in a forked child (their threads did not survive the fork).

    The child gets its own exporter thread, pipelines and resource (its own ``process.pid``);
    the parent's objects are left untouched. The Prometheus listener stays with the parent.
    """
    global _run
    try:
        with _lock:
            old = _run
            _run = None
        if old is None:
            return
        _orphans.append(old)
        if old.prometheus is not None:
            old.prometheus.drop_after_fork()
        for ident in old.idents:
            _callsite.unregister_agent_thread(ident)
        names = tuple(n for n in old.config.exporters if n not in ("none", "prometheus"))
        if not names:
            return
        with _lock:
            run = _Run(old.config)
            run.forked = True
            _run = run
            _spawn(run, names)
    except Exception:
        _log.internal_error("exporter restart after fork")


def wait_ready(timeout: float = 10.0) -> bool:
    """Wait until the exporter thread finished its set-up (tests, ``connwatch doctor``)."""
    run = _run
    return run is not None and run.ready.wait(timeout)


def prometheus_address() -> Optional[Tuple[str, int]]:
    """Where ``/metrics`` is served in this process, if it is."""
    run = _run
    return None if run is None or run.prometheus is None else run.prometheus.address


def collector() -> Optional[_readings.Collector]:
    """The running exporters' metric collector (None when none runs)."""
    run = _run
    return None if run is None else run.collector


def export_now(timeout: float = 5.0) -> None:
    """Collect and export once from the calling thread (tests, debugging)."""
    run = _run
    if run is None:
        return
    for pipe in list(run.pipelines):
        pipe.export(timeout)

