"""``opentelemetry-instrument python app.py`` loads connwatch through this instrumentor.

Registered as the ``connwatch`` entry point of the ``opentelemetry_instrumentor`` group.
Settings come from the same ``CONNWATCH_*`` / ``OTEL_*`` environment as always.
"""

from __future__ import annotations

from typing import Any, Collection

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]


class ConnwatchInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Starts the connwatch agent (``bootstrap.start``) and stops it on uninstrument."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        from .. import bootstrap

        bootstrap.start()

    def _uninstrument(self, **kwargs: Any) -> None:
        from .. import bootstrap

        bootstrap.stop()
