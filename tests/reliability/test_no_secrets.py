"""No leak of the app's data: URL credentials, query strings and request bodies never appear in
snapshot files, the agent's log records, exported metrics (console OTLP JSON and Prometheus
text) or ``connwatch report``, even where they are handed to client constructors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Server, clean_env

from .conftest import last_json, run, write_app

SECRETS = ("password", "s3cr3tpw", "SECRET", "token=", "BODY-SECRET", "user:", "jdoe")

SECRET_APP = '''\
import asyncio, json, logging, os, sys, time, urllib.request
import aiohttp, httpx, requests, urllib3
import connwatch
from connwatch import exporters

log = logging.getLogger("connwatch")
handler = logging.FileHandler(os.environ["AGENT_LOG"])
handler.setLevel(logging.DEBUG)
log.addHandler(handler)
log.setLevel(logging.DEBUG)

PORT = int(sys.argv[1])
URL = "http://jdoe:s3cr3tpw@127.0.0.1:%d/path/private?token=SECRET-TOKEN&password=x" % PORT
PROXY = "http://jdoe:s3cr3tpw@127.0.0.1:%d/?token=SECRET-PROXY" % PORT
BODY = b"BODY-SECRET-0123456789"
keep = []

s = requests.Session()
assert s.post(URL, data=BODY, timeout=10).status_code == 200
keep.append(s)
pm = urllib3.PoolManager()
assert pm.request("POST", URL, body=BODY).status == 200
keep.append(pm)
keep.append(urllib3.ProxyManager(PROXY))
keep.append(urllib3.connection_from_url(URL))
hc = httpx.Client(base_url=URL)
assert hc.post(URL, content=BODY).status_code == 200
keep.append(hc)

async def aio():
    sess = aiohttp.ClientSession(base_url="http://jdoe:s3cr3tpw@127.0.0.1:%d" % PORT)
    async with sess.post("/path?token=SECRET-AIO", data=BODY) as r:
        assert r.status == 200
    keep.append(sess)
    ac = httpx.AsyncClient(base_url=URL)
    r = await ac.post(URL, content=BODY)
    assert r.status_code == 200
    keep.append(ac)

loop = asyncio.new_event_loop()
loop.run_until_complete(aio())
time.sleep(0.6)  # periodic snapshots, console exports
exporters.wait_ready(20)
host, port = exporters.prometheus_address()
metrics = urllib.request.urlopen("http://%s:%d/metrics" % (host, port), timeout=10).read().decode()
print(json.dumps({"metrics": metrics, "snapshot": connwatch.snapshot().to_dict()}), flush=True)
'''


def test_no_credentials_queries_or_bodies_anywhere(tmp_path: Path, http_server: Server) -> None:
    path, _ = write_app(tmp_path, SECRET_APP)
    folder = tmp_path / "snap"
    agent_log = tmp_path / "agent.log"
    proc = run([str(path), str(http_server.port)], timeout=120, CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder),
               CONNWATCH_SNAPSHOT_INTERVAL="0.1", CONNWATCH_EXPORTER="console,prometheus",
               CONNWATCH_PROMETHEUS_PORT="0", OTEL_METRIC_EXPORT_INTERVAL="200",
               # warnings name call sites and upstreams: make the agent write some
               CONNWATCH_CAP_PER_UPSTREAM="1", CONNWATCH_CAP_MODE="warn", AGENT_LOG=str(agent_log))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    snapshot_text = json.dumps(out["snapshot"])
    files = "".join(p.read_text() for p in folder.glob("*.json"))
    report = subprocess.run([sys.executable, "-m", "connwatch", "report", str(folder)], capture_output=True,
                            text=True, env=clean_env(), timeout=60)
    report_json = subprocess.run([sys.executable, "-m", "connwatch", "report", "--json", str(folder)],
                                 capture_output=True, text=True, env=clean_env(), timeout=60)
    assert report.returncode == 0 and report_json.returncode == 0, report.stderr + report_json.stderr
    log_text = agent_log.read_text()
    # The places actually hold what we looked for: the upstream, the console export, a warning.
    upstream = f"127.0.0.1:{http_server.port}"
    assert upstream in files and upstream in snapshot_text and upstream in report.stdout
    assert "connwatch.clients.live" in proc.stderr, "the console exporter wrote its metrics"
    assert "connwatch_clients_live" in out["metrics"]
    assert "CONNWATCH_CAP_PER_UPSTREAM" in log_text, "the agent logged its cap warning"
    kinds = {r["kind"] for r in out["snapshot"]["callsites"]}
    assert {"requests.Session", "urllib3.PoolManager", "urllib3.ProxyManager", "urllib3.HTTPConnectionPool",
            "httpx.Client", "httpx.AsyncClient", "aiohttp.ClientSession"} <= kinds, kinds
    places = {"snapshot files": files, "snapshot()": snapshot_text, "agent log": log_text,
              "stderr (console export, warnings)": proc.stderr, "/metrics": out["metrics"],
              "connwatch report": report.stdout + report.stderr, "report --json": report_json.stdout}
    for where, text in places.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into {where}"
