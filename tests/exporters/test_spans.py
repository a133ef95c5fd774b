"""Span events: which request created which client, on a real SDK tracer."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import run_app, write_app

SPAN_APP = """
import json, os, socket, sys
import connwatch
from connwatch import _registry
from opentelemetry import trace
hook_before = _registry.on_track is not None
if os.environ.get("SET_PROVIDER") == "1":
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
tracer = trace.get_tracer("app")
outside = socket.socket()  # MARK:outside
with tracer.start_as_current_span("handle-request"):
    inside = socket.socket()  # MARK:inside
events = []
if os.environ.get("SET_PROVIDER") == "1":
    for s in spans.get_finished_spans():
        for e in s.events:
            events.append([s.name, e.name, dict(e.attributes)])
print(json.dumps({"hook_before": hook_before, "hook": _registry.on_track is not None, "events": events}))
"""


def _run(tmp_path: Path, **env: str) -> dict:
    path, marks = write_app(tmp_path, SPAN_APP)
    proc = run_app(path, CONNWATCH_EXPORTER="prometheus", CONNWATCH_PROMETHEUS_PORT="0", **env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["marks"] = marks
    out["path"] = str(path)
    return out


def test_event_on_the_recording_span(tmp_path: Path) -> None:
    out = _run(tmp_path, SET_PROVIDER="1")
    assert out["hook_before"] is False, "no cost before a real tracer provider is set"
    assert out["hook"] is True
    assert len(out["events"]) == 1, out
    span, name, attrs = out["events"][0]
    assert (span, name) == ("handle-request", "connwatch.client.created")
    assert attrs["code.line.number"] == out["marks"]["inside"]
    assert attrs["code.file.path"] == out["path"]
    assert attrs["code.function.name"] == "<module>"
    assert attrs["connwatch.client.kind"] == "socket"


def test_no_hook_without_a_tracer_provider(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert out["hook"] is False and out["events"] == []


def test_opt_out(tmp_path: Path) -> None:
    out = _run(tmp_path, SET_PROVIDER="1", CONNWATCH_SPAN_EVENTS="0")
    assert out["hook"] is False and out["events"] == []
