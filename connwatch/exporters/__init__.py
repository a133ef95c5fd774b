"""Exporters: where snapshots and metrics go (snapshot files, OTLP, Prometheus, console)."""
