"""Small real OTLP metric receivers for tests: gRPC (MetricsService) and HTTP (POST /v1/metrics).

Both decode ``ExportMetricsServiceRequest`` with the opentelemetry-proto stubs, listen on
127.0.0.1 (random port) and keep what they received for assertions.
"""

from __future__ import annotations

import http.server
import threading
import time
from concurrent import futures
from typing import Any, Dict, List, Optional, Tuple

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

Point = Tuple[Dict[str, Any], Dict[str, Any], float]  # (resource attrs, point attrs, value)


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def attrs(kvs: Any) -> Dict[str, Any]:
    """OTLP KeyValue list -> dict (ints stay ints)."""
    return {kv.key: _value(kv.value) for kv in kvs}


class _Store:
    def __init__(self) -> None:
        self.requests: List[Any] = []
        self.headers: List[Dict[str, str]] = []
        self.lock = threading.Lock()

    def add(self, req: Any, headers: Dict[str, str]) -> None:
        with self.lock:
            self.requests.append(req)
            self.headers.append({k.lower(): v for k, v in headers.items()})

    def points(self, name: str) -> List[Point]:
        """Every data point of metric ``name`` received so far."""
        out: List[Point] = []
        with self.lock:
            reqs = list(self.requests)
        for req in reqs:
            for rm in req.resource_metrics:
                res = attrs(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != name:
                            continue
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points:
                            v = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                            out.append((res, attrs(p.attributes), v))
        return out

    def wait_for(self, name: str, pred: Any, timeout: float = 20.0) -> List[Point]:
        """Wait until some point of ``name`` satisfies ``pred``; returns the matching points."""
        deadline = time.monotonic() + timeout
        while True:
            found = [p for p in self.points(name) if pred(p)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


class _Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: Any, context: Any) -> Any:
        self.store.add(request, dict(context.invocation_metadata()))
        return metrics_service_pb2.ExportMetricsServiceResponse()


class GrpcReceiver(_Store):
    """OTLP/gRPC on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        super().__init__()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Servicer(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


class HttpReceiver(_Store):
    """OTLP/HTTP (protobuf) on 127.0.0.1:<port>/v1/metrics."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/metrics" or "protobuf" not in self.headers.get("Content-Type", ""):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                req = metrics_service_pb2.ExportMetricsServiceRequest()
                req.ParseFromString(body)
                store.add(req, dict(self.headers.items()))
                out = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def point_for(points: List[Point], file_suffix: str, line: Optional[int] = None) -> List[Point]:
    """Points whose code.file.path ends with ``file_suffix`` (and code.line.number == line)."""
    return [p for p in points if str(p[1].get("code.file.path", "")).endswith(file_suffix)
            and (line is None or p[1].get("code.line.number") == line)]
