"""Span events: ``connwatch.client.created`` on the active span when a client is created.

No cost without a tracer: the registry's ``on_track`` hook stays None until the app has
imported ``opentelemetry.trace`` *and* set a real TracerProvider (not the API's proxy or
no-op one). We never import OpenTelemetry ourselves for this: an import hook fires when the
app imports it, and ``set_tracer_provider`` is wrapped to re-check when the app sets one.
"""

from __future__ import annotations

from types import ModuleType

from .. import _importhook, _log, _registry

TYPE_CHECKING = False  # typing costs ~5 ms at interpreter start; annotations are strings here
if TYPE_CHECKING:
    from typing import Any, Optional

EVENT = "connwatch.client.created"
_MODULE = "opentelemetry.trace"


class _State:
    installed = False
    trace: Optional[ModuleType] = None
    original_set: Any = None


def install(enabled: bool) -> None:
    """Watch for a tracer provider (``enabled``: CONNWATCH_SPAN_EVENTS); idempotent."""
    if not enabled or _State.installed:
        return
    _State.installed = True
    _importhook.when_imported(_MODULE, _on_trace_imported)


def uninstall() -> None:
    """Stop adding events and restore ``set_tracer_provider``."""
    _State.installed = False
    _importhook.discard(_MODULE, _on_trace_imported)
    if _registry.on_track is _on_track:
        _registry.on_track = None
    mod, orig = _State.trace, _State.original_set
    if mod is not None and orig is not None and getattr(mod, "set_tracer_provider", None) is _set_tracer_provider:
        setattr(mod, "set_tracer_provider", orig)
    _State.trace = None
    _State.original_set = None


def _on_trace_imported(module: ModuleType) -> None:
    if not _State.installed:
        return
    _State.trace = module
    current = getattr(module, "set_tracer_provider", None)
    if current is not None and current is not _set_tracer_provider:
        _State.original_set = current
        module.set_tracer_provider = _set_tracer_provider  # type: ignore[attr-defined]
    _recheck()


def _set_tracer_provider(tracer_provider: Any) -> None:
    """``opentelemetry.trace.set_tracer_provider``, then start span events if it is real."""
    orig = _State.original_set
    if orig is not None:
        orig(tracer_provider)
    _recheck()


def _recheck() -> None:
    mod = _State.trace
    if mod is None or not _State.installed:
        return
    try:
        provider = mod.get_tracer_provider()
        fake = tuple(c for c in (getattr(mod, "ProxyTracerProvider", None), getattr(mod, "NoOpTracerProvider", None))
                     if isinstance(c, type))
        real = not isinstance(provider, fake)
    except Exception:
        _log.internal_error("span events: tracer provider check")
        return
    if real:
        _State.get_current_span = mod.get_current_span  # type: ignore[attr-defined]
        _registry.on_track = _on_track


def _on_track(obj: object, kind: str, site: Any, upstream: Optional[str]) -> None:
    span = _State.get_current_span()  # type: ignore[attr-defined]
    if not span.is_recording():
        return
    from . import _readings  # loaded once spans are recorded, not at start

    attrs: dict = {_readings.KIND: kind, _readings.FILE: site.file, _readings.LINE: site.line,
                   _readings.FUNCTION: site.function}
    if upstream is not None:
        host, port = _readings.split_upstream(upstream)
        attrs[_readings.ADDRESS] = host
        if port is not None:
            attrs[_readings.PORT] = port
    span.add_event(EVENT, attrs)
