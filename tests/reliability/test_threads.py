"""16 threads creating and closing sockets, grpc channels, urllib3 managers, requests and httpx
sessions at once, while the snapshot writer reads every 10 ms and a cap check reserves slots:
exact final counts, no exception anywhere, no deadlock (every thread joins in bounded time)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Server

from .conftest import last_json, run, snapshot_files, totals, write_app

CHURN_APP = '''\
import json, os, socket, sys, threading, time, traceback
import grpc, httpx, requests, urllib3
import connwatch

HTTP = "http://127.0.0.1:%s/x" % sys.argv[1]
SECONDS = float(sys.argv[2])
srv = socket.create_server(("127.0.0.1", 0), backlog=4096)  # MARK:listener
srv.settimeout(0.2)
TCP = srv.getsockname()
accepted = [0]
done = threading.Event()

def acceptor():
    while True:
        try:
            c, _ = srv.accept()  # MARK:accept
        except socket.timeout:
            if done.is_set():
                return
            continue
        c.close()
        accepted[0] += 1

acceptor_thread = threading.Thread(target=acceptor, daemon=True)
acceptor_thread.start()
counts = {}
errors = []
start = threading.Barrier(16)

def churn(i):
    made = {"sock": 0, "grpc": 0, "pool": 0, "session": 0, "httpx": 0, "get": 0}
    try:
        start.wait(30)
        end = time.monotonic() + SECONDS
        n = 0
        while time.monotonic() < end:
            n += 1
            for _ in range(40):
                s = socket.create_connection(TCP)  # MARK:sock
                s.close()
                made["sock"] += 1
            for _ in range(5):
                ch = grpc.insecure_channel("127.0.0.1:%d" % TCP[1])  # MARK:grpc
                ch.close()
                made["grpc"] += 1
                pm = urllib3.PoolManager()  # MARK:pool
                pm.clear()
                made["pool"] += 1
            with requests.Session() as sess:  # MARK:session
                if n % 2 == 0:
                    assert sess.get(HTTP, timeout=10).status_code == 200  # MARK:get
                    made["get"] += 1
            made["session"] += 1
            if n % 4 == 1:
                with httpx.Client() as hc:  # MARK:httpx
                    pass
                made["httpx"] += 1
    except BaseException:
        errors.append(traceback.format_exc())
    counts[i] = made

threads = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(16)]
for t in threads:
    t.start()
deadline = time.monotonic() + SECONDS + 60
for t in threads:
    t.join(max(0.1, deadline - time.monotonic()))
hung = sum(t.is_alive() for t in threads)
done.set()
acceptor_thread.join(30)
hung += acceptor_thread.is_alive()
srv.close()
total = {k: sum(c[k] for c in counts.values()) for k in ("sock", "grpc", "pool", "session", "httpx", "get")}
total["accepted"] = accepted[0]
print(json.dumps({"hung": hung, "errors": errors, "made": total}), flush=True)
sys.exit(0)
'''


def test_sixteen_threads_churning_every_client_kind(tmp_path: Path, http_server: Server) -> None:
    path, marks = write_app(tmp_path, CHURN_APP)
    folder = tmp_path / "snap"
    # A cap high enough never to be hit still makes every client go through the reservation
    # under the registry lock; the writer takes snapshots (reads under the lock) every 10 ms.
    proc = run([str(path), str(http_server.port), "2.0"], timeout=150,
               CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(folder), CONNWATCH_SNAPSHOT_INTERVAL="0.01",
               CONNWATCH_CAP="1000000", CONNWATCH_CAP_PER_CALLSITE="1000000")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["hung"] == 0, "a thread never finished: deadlock"
    assert out["errors"] == []
    assert "Traceback" not in proc.stderr and "connwatch" not in proc.stderr, proc.stderr
    made = out["made"]
    assert made["httpx"] >= 16 and made["sock"] >= 16 * 40, made  # every thread did real work
    (data,) = snapshot_files(folder).values()
    assert data["totals"]["live"] == data["totals"]["created"] - data["totals"]["closed"]
    for mark, kind in (("sock", "socket"), ("grpc", "grpc.Channel"), ("pool", "urllib3.PoolManager"),
                       ("session", "requests.Session"), ("httpx", "httpx.Client")):
        live, created, closed = totals(data, path, marks[mark], kind)
        assert (live, created, closed) == (0, made[mark], made[mark]), (mark, live, created, closed, made)
    assert totals(data, path, marks["accept"], "socket") == (0, made["sock"], made["sock"])
    assert totals(data, path, marks["listener"], "socket") == (0, 1, 1)
    # One keep-alive socket per session that made a GET, closed with its session.
    assert totals(data, path, marks["get"], "socket") == (0, made["get"], made["get"])
    assert data["cap"]["exceeded"] == 0
