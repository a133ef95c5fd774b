"""Exporters: where snapshots and metrics go (snapshot files, OTLP, Prometheus, console).

``start(config)`` is called by the bootstrap when ``config.exporters`` is not empty; it must
return at once and do any heavy import (opentelemetry) on a background thread. ``stop()`` and
``after_fork_child()`` are always safe to call.
"""

from __future__ import annotations

from typing import Any

from .. import _log


def start(config: Any) -> None:
    """Start the configured metric exporters in the background."""
    for name in config.exporters:
        _log.warn_once("exporter:" + name, "exporter %r is not available in this version; ignored", name)


def stop() -> None:
    """Flush and stop the metric exporters (bounded in time)."""


def after_fork_child() -> None:
    """Restart exporters in a forked child (their threads did not survive the fork)."""
