"""``/metrics`` in the Prometheus text format (0.0.4), served by a small stdlib HTTP server.

Why not opentelemetry-exporter-prometheus: it needs the SDK and prometheus_client (and their
import time) for what is one registry walk rendered as text; this server needs neither, so
``CONNWATCH_EXPORTER=prometheus`` works without the ``otlp`` extra. Names are the OTLP
contract names translated the usual way (dots to underscores, ``_total`` on counters):
``connwatch_clients_live``, ``connwatch_clients_created_total``, ``connwatch_clients_short_lived_total``,
``connwatch_cap_exceeded_total``,
``process_unix_file_descriptor_count``, ``connwatch_fd_limit``, ``connwatch_fd_utilization``.

The listener and every accepted connection are made on this module's threads, so the call-site
walk classifies them as the agent's own: they are never counted.
"""

from __future__ import annotations

import http.server
import socket
import socketserver
import threading
from typing import Any, Dict, List, Optional, Tuple

from .. import _log
from . import _readings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRICS: Tuple[Tuple[str, str, str, str], ...] = (
    # (reading field, exposition name, type, help)
    ("live", "connwatch_clients_live", "gauge", "Live network clients per call site"),
    ("created", "connwatch_clients_created_total", "counter", "Clients created per call site"),
    ("short_lived", "connwatch_clients_short_lived_total", "counter",
     "Clients released within 10 s of their creation, per call site (a client built per call)"),
    ("cap_exceeded", "connwatch_cap_exceeded_total", "counter", "New clients over a connwatch cap"),
)


def label_name(key: str) -> str:
    """An attribute key as a Prometheus label name (``code.file.path`` -> ``code_file_path``)."""
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in key)
    return "_" + out if out[:1].isdigit() else out


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(attrs: _readings.Attrs) -> str:
    if not attrs:
        return ""
    return "{" + ",".join(f'{label_name(k)}="{_escape(v)}"' for k, v in attrs) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render(reading: _readings.Reading) -> str:
    """The text exposition of one reading."""
    lines: List[str] = []
    for field, name, kind, help_text in _METRICS:
        values: Dict[_readings.Attrs, int] = getattr(reading, field)
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for attrs, value in _readings.series(values):
            lines.append(f"{name}{_labels(attrs)} {_number(value)}")
    fd_rows: Tuple[Tuple[Optional[float], str, str], ...] = (
        (reading.fd_open, "process_unix_file_descriptor_count", "Open file descriptors of the process"),
        (reading.fd_limit, "connwatch_fd_limit", "Soft limit on open file descriptors (RLIMIT_NOFILE)"),
        (reading.fd_utilization, "connwatch_fd_utilization", "Open file descriptors / their soft limit"),
    )
    for fd_value, name, help_text in fd_rows:
        if fd_value is None:
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        lines.append(f"{name} {_number(fd_value)}")
    return "\n".join(lines) + "\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that connects and says nothing does not hold the server
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._send(404, b"not found: try /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = render(self.server.collector.reading()).encode()
        except Exception:
            _log.internal_error("prometheus render")
            self._send(500, b"connwatch: internal error\n", "text/plain; charset=utf-8")
            return
        self._send(200, body, CONTENT_TYPE)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes do not belong in the app's output


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    collector: _readings.Collector

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn): skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's thread target is in socketserver: start ours, so the handler's stack
        # has a connwatch/exporters frame at its bottom.
        t = threading.Thread(target=_handle, args=(self, request, client_address),
                             name="connwatch-prometheus-request", daemon=True)
        t.start()


def _handle(server: _Server, request: Any, client_address: Any) -> None:
    server.process_request_thread(request, client_address)


class PrometheusServer:
    """The ``/metrics`` listener; ``start`` binds at once, ``serve`` runs on its own thread."""

    def __init__(self, collector: _readings.Collector, host: str = "127.0.0.1", port: int = 9464) -> None:
        self.collector = collector
        self.host = host
        self.port = port
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """(host, port) actually bound, once started."""
        s = self._server
        return None if s is None else (str(s.server_address[0]), int(s.server_address[1]))

    def start(self) -> Optional[threading.Thread]:
        """Bind and serve on a daemon thread; returns the thread, or None when the port is taken."""
        cls: Any = _Server
        if ":" in self.host:
            cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            server = cls((self.host, self.port), _Handler)
        except OSError as e:
            _log.warn_once("prometheus-bind", "cannot serve Prometheus metrics on %s:%s (%s); "
                           "set CONNWATCH_PROMETHEUS_PORT / CONNWATCH_PROMETHEUS_HOST", self.host,
                           self.port, e.strerror or e)
            return None
        server.collector = self.collector
        self._server = server
        t = threading.Thread(target=_serve, args=(server,), name="connwatch-prometheus", daemon=True)
        self._thread = t
        t.start()
        return t

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop serving and close the listener."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.shutdown()
        except Exception:
            pass
        try:
            server.server_close()
        except Exception:
            pass
        t = self._thread
        if t is not None:
            t.join(timeout_s)

    def drop_after_fork(self) -> None:
        """In a forked child: close the inherited listener copy without touching the parent's."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.socket.close()
            except Exception:
                pass


def _serve(server: _Server) -> None:
    try:
        server.serve_forever(poll_interval=0.25)
    except Exception:
        _log.internal_error("prometheus server")
