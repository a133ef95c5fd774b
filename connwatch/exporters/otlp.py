"""OTLP (grpc or http/protobuf) and console metric export through the OpenTelemetry SDK.

Everything here runs on the ``connwatch-exporter`` thread, never on the app's: importing the
SDK and the OTLP exporter costs 60-130 ms. The SDK reads its own ``OTEL_*`` variables
(endpoint, headers, timeout, compression, certificates, temporality, service name, resource
attributes, ``OTEL_SDK_DISABLED``); connwatch picks the exporter class from
``OTEL_EXPORTER_OTLP[_METRICS]_PROTOCOL`` (what the SDK's auto-configuration does too) and
drives collection from its own thread at ``OTEL_METRIC_EXPORT_INTERVAL``.

Why a private ``MeterProvider``: the app's global provider (if any) is left alone, and these
instruments and their resource (with ``process.pid``) are ours. Why a reader with an infinite
interval driven by our thread: the SDK's periodic reader runs on a thread with no connwatch
frame (its sockets would need extra bookkeeping to be excluded) and re-forks itself in a
child with the parent's exporter; ours does neither.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from typing import Any, Dict, Iterable, List, Optional

from .. import _fds, _log
from . import _readings

DEFAULT_INTERVAL_S = 60.0
# Used only when no OTEL_EXPORTER_OTLP[_METRICS]_TIMEOUT is set: a dead collector must not
# hold the exporter thread for the SDK's default of 10 s per attempt (plus retries).
DEFAULT_TIMEOUT_S = 5.0
FAILURE_LOG_PERIOD_S = 300.0
_LOGGER_PREFIXES = ("opentelemetry.exporter", "opentelemetry.sdk", "grpc")


# Below this many free descriptors the agent does not call into grpc (see _Guarded.export).
MIN_FREE_FDS = 64


def interval_s(env: Optional[Dict[str, str]] = None) -> float:
    """``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds, as the SDK reads it) in seconds."""
    raw = (os.environ if env is None else env).get("OTEL_METRIC_EXPORT_INTERVAL")
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw) / 1000.0
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        _log.warn_once("otel-interval", "ignoring OTEL_METRIC_EXPORT_INTERVAL=%r; using %g ms", raw,
                       DEFAULT_INTERVAL_S * 1000)
        return DEFAULT_INTERVAL_S
    return max(value, 0.05)


def protocol(env: Optional[Dict[str, str]] = None) -> str:
    """``grpc`` or ``http/protobuf`` from the OTLP protocol variables (default grpc)."""
    e = os.environ if env is None else env
    raw = (e.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or e.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    value = raw.strip().lower()
    if value in ("grpc", "http/protobuf"):
        return value
    _log.warn_once("otel-protocol", "unsupported OTLP protocol %r (use grpc or http/protobuf); using grpc", raw)
    return "grpc"


def sdk_disabled() -> bool:
    """Whether ``OTEL_SDK_DISABLED`` turns the SDK off (its own reading of the variable)."""
    try:
        from opentelemetry.sdk.environment_variables import OTEL_SDK_DISABLED
    except ImportError:  # pragma: no cover - very old SDK
        OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
    return os.environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true"


class _ExportLogFilter(logging.Filter):
    """Holds back the SDK's per-failure log records emitted on the agent's threads.

    The exporter logs every failed export (and each retry); a dead collector would then write
    a warning per interval into the app's log. Records from other threads (the app's own
    OpenTelemetry use) pass untouched. :class:`Pipeline` reports failures itself, rate-limited.
    """

    def __init__(self, idents: set) -> None:
        super().__init__("connwatch")
        self.idents = idents
        self.held = 0
        self.last: Optional[str] = None

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() not in self.idents:
            return True
        self.held += 1
        if record.levelno >= logging.WARNING:
            try:
                self.last = record.getMessage()
            except Exception:
                self.last = str(record.msg)
        return False


class Pipeline:
    """A MeterProvider with connwatch's instruments and one exporter, collected on demand."""

    def __init__(self, name: str, collector: _readings.Collector, service: Optional[str],
                 idents: set) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        self.name = name
        self.collector = collector
        self.failures = 0
        self.failing = False
        self.exporter = self._make_exporter(name)
        self.target = self._describe_target(name)
        self.log_filter = _ExportLogFilter(idents)
        install_log_filter(self.log_filter)
        wrapped = _guard(self)
        self.reader = PeriodicExportingMetricReader(wrapped, export_interval_millis=math.inf)
        self.provider = MeterProvider(
            metric_readers=[self.reader], resource=_resource(service), shutdown_on_exit=False,
            **_views(collector.max_callsites),
        )
        meter = self.provider.get_meter("connwatch", _version())
        self._instruments(meter)

    # -- construction --------------------------------------------------------------------------

    @staticmethod
    def _make_exporter(name: str) -> Any:
        if name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            return ConsoleMetricExporter(out=sys.stderr)
        proto = protocol()
        kwargs: Dict[str, Any] = {}
        if not any(os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")):
            kwargs["timeout"] = DEFAULT_TIMEOUT_S
        if proto == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Http

            return Http(**kwargs)
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Grpc

        return Grpc(**kwargs)

    @staticmethod
    def _describe_target(name: str) -> str:
        if name == "console":
            return "stderr"
        e = os.environ
        return (e.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or e.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or "the default OTLP endpoint") + f" ({protocol()})"

    def _instruments(self, meter: Any) -> None:
        from opentelemetry.metrics import Observation

        c = self.collector

        def obs(values: Dict[_readings.Attrs, int]) -> List[Any]:
            return [Observation(v, dict(a)) for a, v in values.items()]

        def live(_options: Any) -> Iterable[Any]:
            return obs(c.reading().live)

        def created(_options: Any) -> Iterable[Any]:
            return obs(c.reading().created)

        def short_lived(_options: Any) -> Iterable[Any]:
            return obs(c.reading().short_lived)

        def cap(_options: Any) -> Iterable[Any]:
            return obs(c.reading().cap_exceeded)

        def fd_open(_options: Any) -> Iterable[Any]:
            v = c.reading().fd_open
            return [] if v is None else [Observation(v)]

        def fd_limit(_options: Any) -> Iterable[Any]:
            v = c.reading().fd_limit
            return [] if v is None else [Observation(v)]

        def fd_util(_options: Any) -> Iterable[Any]:
            v = c.reading().fd_utilization
            return [] if v is None else [Observation(v)]

        meter.create_observable_gauge("connwatch.clients.live", [live], unit="{client}",
                                      description="Live network clients per call site")
        meter.create_observable_counter("connwatch.clients.created", [created], unit="{client}",
                                        description="Clients created per call site")
        meter.create_observable_counter("connwatch.clients.short_lived", [short_lived], unit="{client}",
                                        description="Clients released within 10 s of their creation, per call site "
                                                    "(a client built per call)")
        meter.create_observable_counter("connwatch.cap.exceeded", [cap], unit="{client}",
                                        description="New clients over a connwatch cap")
        meter.create_observable_up_down_counter("process.unix.file_descriptor.count", [fd_open],
                                                unit="{file_descriptor}",
                                                description="Open file descriptors of the process")
        meter.create_observable_gauge("connwatch.fd.limit", [fd_limit], unit="{file_descriptor}",
                                      description="Soft limit on open file descriptors (RLIMIT_NOFILE)")
        meter.create_observable_gauge("connwatch.fd.utilization", [fd_util], unit="1",
                                      description="Open file descriptors / their soft limit")

    # -- running -------------------------------------------------------------------------------

    def export(self, timeout_s: float) -> None:
        """Collect and export once (on the exporter thread); never raises."""
        try:
            self.reader.collect(timeout_millis=timeout_s * 1000)
        except Exception:
            _log.internal_error(f"{self.name} metric collection")

    def exported(self, ok: bool, error: Optional[str] = None) -> None:
        """Account for one export attempt: one warning at the first failure, then rate-limited."""
        if ok:
            if self.failing:
                _log.warn_every(f"export-ok:{self.name}", FAILURE_LOG_PERIOD_S,
                                "metric export to %s works again after %d failed attempts",
                                self.target, self.failures)
            self.failing = False
            self.failures = 0
            return
        self.failures += 1
        self.failing = True
        reason = error or self.log_filter.last or "the exporter reported a failure"
        _log.warn_every(f"export-fail:{self.name}", FAILURE_LOG_PERIOD_S,
                        "metric export to %s failed (%s); the app is unaffected; %d failed attempt(s) "
                        "so far, reported at most every %d s", self.target, reason, self.failures,
                        int(FAILURE_LOG_PERIOD_S))

    def shutdown(self, timeout_s: float) -> None:
        """Final export, then close the exporter (bounded by ``timeout_s``)."""
        try:
            self.provider.shutdown(timeout_millis=max(1.0, timeout_s * 1000))
        except Exception:
            _log.internal_error(f"{self.name} exporter shutdown")


def _guard(pipe: Pipeline) -> Any:
    """The exporter behind a wrapper that never raises and accounts for failures.

    Its ``export`` is a frame in connwatch/exporters/ on every export's stack, so clients the
    exporter creates while exporting are classified as the agent's own.
    """
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    inner = pipe.exporter

    class _Guarded(MetricExporter):
        def __init__(self) -> None:
            super().__init__(preferred_temporality=inner._preferred_temporality,
                             preferred_aggregation=inner._preferred_aggregation)

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            if not _fds.has_headroom(MIN_FREE_FDS):
                # grpc's C core aborts the process when it cannot get a descriptor (a new
                # connection's epoll set, say): no export while the app is this short of them.
                pipe.exported(False, "too few free file descriptors; export skipped")
                return MetricExportResult.FAILURE
            try:
                result = inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
            except Exception as e:
                pipe.exported(False, f"{type(e).__name__}: {e}")
                return MetricExportResult.FAILURE
            pipe.exported(result == MetricExportResult.SUCCESS)
            return result

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            try:
                return bool(inner.force_flush(timeout_millis=timeout_millis))
            except Exception:
                return False

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            try:
                inner.shutdown(timeout_millis=timeout_millis, **kwargs)
            except Exception:
                pass

    return _Guarded()


def install_log_filter(flt: logging.Filter) -> None:
    """Attach ``flt`` to every existing OpenTelemetry exporter/SDK and grpc logger.

    A filter on a logger does not apply to its children, so each logger gets it.
    """
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(_LOGGER_PREFIXES)]
    for name in names:
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


def _resource(service: Optional[str]) -> Any:
    from opentelemetry.sdk.resources import Resource

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself.
    resource = Resource.create({"process.pid": os.getpid()})
    current = str(resource.attributes.get("service.name", ""))
    if service and (not current or current.startswith("unknown_service")):
        resource = resource.merge(Resource({"service.name": service}))
    return resource


def _views(max_callsites: int) -> Dict[str, Any]:
    """Raise the SDK's per-instrument cardinality limit to what our own bound allows."""
    try:
        import inspect

        from opentelemetry.sdk.metrics.view import View

        if "aggregation_cardinality_limit" not in inspect.signature(View.__init__).parameters:
            return {}
        limit = 2 * max_callsites + 64
        view = View(instrument_name="connwatch.*", aggregation_cardinality_limit=limit)  # type: ignore[call-arg]
        return {"views": [view]}
    except Exception:
        return {}


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "0"
