"""OTLP export to real receivers over loopback (gRPC and HTTP/protobuf)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import SITES_SNIPPET, free_port, run_app, sites, write_app
from .otlp_receiver import GrpcReceiver, HttpReceiver, point_for

LEAK_APP = """
import os, socket, sys, time
import connwatch
host, port = sys.argv[0] and os.environ["TARGET_HOST"], int(os.environ["TARGET_PORT"])
keep = []
def leak():
    for _ in range(5):
        keep.append(socket.create_connection((host, port)))  # MARK:leak
leak()
deadline = time.monotonic() + float(os.environ.get("APP_SECONDS", "1.5"))
while time.monotonic() < deadline:
    time.sleep(0.05)
print("pid", os.getpid(), flush=True)
""" + SITES_SNIPPET


def _leak_run(tmp_path: Path, tcp_server: Any, **env: str) -> Any:
    path, marks = write_app(tmp_path, LEAK_APP)
    proc = run_app(path, TARGET_HOST="127.0.0.1", TARGET_PORT=str(tcp_server.port),
                   OTEL_METRIC_EXPORT_INTERVAL="200", **env)
    assert proc.returncode == 0, proc.stderr
    return path, marks, proc


def _check_leak_points(receiver: Any, path: Path, line: int, tcp_port: int, pid: int) -> None:
    def match(p: Any) -> bool:
        return p[1].get("code.line.number") == line and p[2] == 5 and p[0].get("process.pid") == pid

    pts = receiver.wait_for("connwatch.clients.live", match, timeout=10)
    assert pts, f"no live=5 point for line {line}: {receiver.points('connwatch.clients.live')[:5]}"
    res, attrs, _value = pts[-1]
    assert attrs["code.file.path"] == str(path)
    assert isinstance(attrs["code.line.number"], int)
    assert attrs["code.function.name"] == "leak"
    assert attrs["connwatch.client.kind"] == "socket"
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == tcp_port
    assert res["service.name"] == "leaky-svc"
    assert res["deployment.environment"] == "test"
    created = point_for(receiver.points("connwatch.clients.created"), str(path), line)
    assert created and max(p[2] for p in created) == 5
    fds = receiver.points("process.unix.file_descriptor.count")
    limit = receiver.points("connwatch.fd.limit")
    util = receiver.points("connwatch.fd.utilization")
    assert fds and limit and util
    assert 0 < util[-1][2] < 1
    assert fds[-1][2] >= 5


def _check_nothing_of_the_agent(out: str, path: Path) -> None:
    # Everything live or ever created in the app's snapshot is the app's own: the exporter's
    # channel, sessions and sockets never count.
    rows = sites(out)
    assert rows, "the app's own leak must be there"
    foreign = [r for r in rows if r[2] != str(path)]
    assert not foreign, foreign


def test_grpc_export_of_a_leaking_call_site(tmp_path: Path, tcp_server: Any,
                                            grpc_receiver: GrpcReceiver) -> None:
    path, marks, proc = _leak_run(
        tmp_path, tcp_server, OTEL_EXPORTER_OTLP_ENDPOINT=grpc_receiver.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_SERVICE_NAME="leaky-svc",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        OTEL_EXPORTER_OTLP_HEADERS="x-connwatch-token=abc123")
    pid = int(proc.stdout.split("pid", 1)[1].split()[0])
    _check_leak_points(grpc_receiver, path, marks["leak"], tcp_server.port, pid)
    assert any(h.get("x-connwatch-token") == "abc123" for h in grpc_receiver.headers)
    _check_nothing_of_the_agent(proc.stdout, path)


def test_http_export_of_a_leaking_call_site(tmp_path: Path, tcp_server: Any,
                                            http_receiver: HttpReceiver) -> None:
    path, marks, proc = _leak_run(
        tmp_path, tcp_server, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=http_receiver.endpoint,
        OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="http/protobuf",
        OTEL_RESOURCE_ATTRIBUTES="service.name=leaky-svc,deployment.environment=test",
        OTEL_EXPORTER_OTLP_HEADERS="x-connwatch-token=abc123")
    pid = int(proc.stdout.split("pid", 1)[1].split()[0])
    _check_leak_points(http_receiver, path, marks["leak"], tcp_server.port, pid)
    assert any(h.get("x-connwatch-token") == "abc123" for h in http_receiver.headers)
    # Several exports went over HTTP from this process (each over sockets the agent made).
    assert len(http_receiver.requests) >= 3
    _check_nothing_of_the_agent(proc.stdout, path)


def test_sdk_disabled_exports_nothing(tmp_path: Path, tcp_server: Any, grpc_receiver: GrpcReceiver) -> None:
    _path, _marks, proc = _leak_run(
        tmp_path, tcp_server, OTEL_EXPORTER_OTLP_ENDPOINT=grpc_receiver.endpoint, OTEL_SDK_DISABLED="true",
        APP_SECONDS="1.0")
    time.sleep(0.3)
    assert grpc_receiver.requests == []
    assert "OTEL_SDK_DISABLED" in proc.stderr


STARTUP_APP = """
import sys, threading, time
importers = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in ("opentelemetry.sdk.metrics", "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"):
            importers.append((name, threading.current_thread().name))
        return None
sys.meta_path.insert(0, Spy())
import connwatch
t0 = time.perf_counter()
connwatch.enable(exporter="otlp", snapshot_interval=0)
took = time.perf_counter() - t0
from connwatch import exporters
assert exporters.wait_ready(20)
import json
print(json.dumps({"enable_ms": took * 1000, "importers": importers}), flush=True)
"""


def test_sdk_is_imported_off_the_main_thread(tmp_path: Path, grpc_receiver: GrpcReceiver) -> None:
    path, _ = write_app(tmp_path, STARTUP_APP)
    from tests.conftest import run_py

    from .conftest import last_json

    proc = run_py([str(path)], OTEL_EXPORTER_OTLP_ENDPOINT=grpc_receiver.endpoint,
                  CONNWATCH_DIR=str(tmp_path / "snaps"))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    names = {n for n, _t in out["importers"]}
    assert names == {"opentelemetry.sdk.metrics", "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"}, out
    assert {t for _n, t in out["importers"]} == {"connwatch-exporter"}, out
    # The whole enable() (patches, config, snapshot writer, exporter thread start) on the main thread:
    # measured by benchmarks/run.py (start-up rows), only printed here (tests assert no wall time).
    print(f"main-thread enable() with the OTLP exporter on: {out['enable_ms']:.1f} ms")


OUTAGE_APP = """
import json, os, socket, time
from array import array
import connwatch
from connwatch import exporters
assert exporters.wait_ready(20)
# The gaps go to memory taken (and touched) up front: a growing list would itself add ~40 bytes
# per socket to the RSS measured below (16 MB at ~400k sockets in 3 s).
CAP = 3_000_000
gaps = array("d", bytes(8 * CAP))
rss = []
t_end = time.monotonic() + 3.0
last = time.perf_counter()
n = 0
while time.monotonic() < t_end:
    s = socket.socket(); s.close()  # MARK:work
    now = time.perf_counter()
    if n < CAP:
        gaps[n] = now - last
    n += 1
    last = now
    if n % 20000 == 0:
        rss.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
gaps = sorted(gaps[:min(n, CAP)])
t0 = time.perf_counter()
print(json.dumps({"n": n, "p999_ms": gaps[int(len(gaps) * 0.999)] * 1000, "max_ms": gaps[-1] * 1000,
                  "rss": rss}), flush=True)
"""


@pytest.mark.parametrize("outage", ["unreachable", "blackhole"])
@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_outage_never_blocks_grows_or_spams(tmp_path: Path, outage: str, proto: str) -> None:
    from .conftest import last_json

    hole = None
    if outage == "blackhole":
        # Accepts the TCP handshake (kernel backlog) and never reads or answers.
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(1000)
        port = hole.getsockname()[1]
    else:
        port = free_port()
    path, _ = write_app(tmp_path, OUTAGE_APP)
    endpoint = f"http://127.0.0.1:{port}" + ("/v1/metrics" if proto != "grpc" else "")
    try:
        t0 = time.monotonic()
        proc = run_app(path, CONNWATCH_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=endpoint,
                       OTEL_EXPORTER_OTLP_METRICS_PROTOCOL=proto, OTEL_METRIC_EXPORT_INTERVAL="100",
                       OTEL_EXPORTER_OTLP_TIMEOUT="1")
        took = time.monotonic() - t0
    finally:
        if hole is not None:
            hole.close()
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    # The app's own work kept going at full pace: the export runs on the agent's thread.
    assert out["n"] > 20000, out
    # Exit waits at most the exporter's stop timeout for the final export.
    assert took < 3.0 + 2.0 + 3.0, took
    # Memory: no queue of unsent batches (RSS steady while ~30 exports failed).
    rss = out["rss"]
    if len(rss) >= 2:
        assert rss[-1] - rss[0] < 16 * 1024 * 1024, rss
    # One warning (then at most one per 5 minutes), no per-export spam from the SDK.
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    warnings = [ln for ln in lines if "export" in ln.lower() or "otlp" in ln.lower() or "grpc" in ln.lower()]
    assert 1 <= len(warnings) <= 2, proc.stderr
    assert len(lines) <= 6, proc.stderr
    print(f"{proto}/{outage}: {out['n']} sockets in 3 s, p99.9 gap {out['p999_ms']:.3f} ms, "
          f"max gap {out['max_ms']:.1f} ms, exit after {took:.2f} s, stderr lines {len(lines)}")


FORK_APP = """
import os, socket, sys, threading, time, json
import connwatch
from connwatch import exporters
assert exporters.wait_ready(20)
keep = [socket.socket() for _ in range(2)]  # MARK:parent
pid = os.fork()
if pid == 0:
    kept = [socket.socket() for _ in range(3)]  # MARK:child
    time.sleep(1.5)
    names = [t.name for t in threading.enumerate()]
    print(json.dumps({"child": os.getpid(), "threads": names}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(0.5)
names = [t.name for t in threading.enumerate()]
print(json.dumps({"parent": os.getpid(), "child_pid": pid, "threads": names}), flush=True)
"""


def test_fork_child_exports_its_own(tmp_path: Path, grpc_receiver: GrpcReceiver) -> None:
    import json

    path, marks = write_app(tmp_path, FORK_APP)
    proc = run_app(path, OTEL_EXPORTER_OTLP_ENDPOINT=grpc_receiver.endpoint, OTEL_METRIC_EXPORT_INTERVAL="200")
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    child = next(d for d in docs if "child" in d)
    parent = next(d for d in docs if "parent" in d)
    assert child["threads"].count("connwatch-exporter") == 1, child
    assert parent["threads"].count("connwatch-exporter") == 1, parent
    cpid = child["child"]
    pts = grpc_receiver.wait_for(
        "connwatch.clients.live",
        lambda p: p[0].get("process.pid") == cpid and p[1].get("code.line.number") == marks["child"] and p[2] == 3)
    assert pts, "the child exported its own call site"
    ppts = [p for p in grpc_receiver.points("connwatch.clients.live") if p[0].get("process.pid") == parent["parent"]]
    assert ppts and all(p[1].get("code.line.number") != marks["child"] for p in ppts)


def test_unknown_or_missing_exporter_warns_once(tmp_path: Path) -> None:
    path, _ = write_app(tmp_path, "import connwatch\nfrom connwatch import exporters\n"
                        "exporters.wait_ready(20)\nprint(connwatch.is_enabled())\n")
    proc = run_app(path, CONNWATCH_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1",
                   OTEL_EXPORTER_OTLP_PROTOCOL="bogus", OTEL_METRIC_EXPORT_INTERVAL="nope")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
    assert proc.stderr.count("OTEL_METRIC_EXPORT_INTERVAL") == 1, proc.stderr
    assert proc.stderr.count("bogus") == 1, proc.stderr


def test_exit_during_exporter_set_up_is_quiet(tmp_path: Path) -> None:
    # The app exits while the exporter thread still imports the SDK: no traceback, no hang.
    path, _ = write_app(tmp_path, "print('done')\n")
    proc = run_app(path, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1")
    assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr


def test_export_now_is_safe_without_exporters() -> None:
    from connwatch import exporters

    exporters.export_now()
    exporters.stop()
    exporters.after_fork_child()
    assert exporters.prometheus_address() is None
    assert os.getpid() > 0
