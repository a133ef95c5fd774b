"""Churn: a client built per call is flagged at its line even when every client is closed; a
shared client, a kept pool, a server's accepted sockets and a pool that grows then plateaus are
not (real HTTP, grpc and TCP servers on loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from typing import Any, Dict, List, Tuple

import grpc
import httpx
import requests
import urllib3

from tests.patches.grpc_server import METHOD

CALLS = 15


def _line_of(marker: str) -> int:
    with open(__file__) as f:
        for n, text in enumerate(f, 1):
            if text.rstrip().endswith("# " + marker):
                return n
    raise AssertionError(marker)


def _sites(agent: Any) -> Dict[Tuple[str, int], Any]:
    """(kind/role label, line) -> statistic, for this file's call sites."""
    return {(s.label(), s.site.line): s for s in agent.snapshot().statistics() if s.site and s.site.file == __file__}


def _flagged(agent: Any) -> List[Tuple[str, int]]:
    return sorted(k for k, s in _sites(agent).items() if s.churn is not None and s.churn.suspected)


def test_requests_get_per_call_is_churn(agent: Any, http_server: Any) -> None:
    url = f"http://{http_server.target}/"
    for _ in range(CALLS):
        assert requests.get(url, timeout=10).status_code == 200  # c-requests-get
    line = _line_of("c-requests-get")
    s = _sites(agent)[("requests.Session", line)]
    assert (s.live, s.created) == (0, CALLS), "every Session was closed: no leak"
    assert s.churn is not None and s.churn.suspected
    assert s.churn.released == CALLS and s.churn.median_lifetime_s is not None
    assert s.churn.median_lifetime_s < 10 and s.churn.created_per_min >= 6
    # Its connections churn too, at the same line.
    assert ("requests.Session", line) in _flagged(agent) and ("socket/client", line) in _flagged(agent)
    data = agent.snapshot().to_dict()
    row = next(r for r in data["callsites"] if r["line"] == line and r["kind"] == "requests.Session")
    assert row["suspected_churn"] is True and row["churn"]["released"] == CALLS


def test_grpc_channel_per_call_is_churn(agent: Any, grpc_server: Any) -> None:
    for _ in range(CALLS):
        with grpc.insecure_channel(grpc_server.target) as ch:  # c-grpc
            assert ch.unary_unary(METHOD)(b"x", timeout=10) == b"x"
    assert _flagged(agent) == [("grpc.Channel", _line_of("c-grpc"))]


def test_httpx_client_per_call_is_churn(agent: Any, http_server: Any) -> None:
    url = f"http://{http_server.target}/"
    for _ in range(CALLS):
        with httpx.Client() as client:  # c-httpx
            assert client.get(url, timeout=10).status_code == 200
    assert ("httpx.Client", _line_of("c-httpx")) in _flagged(agent)
    assert all(line == _line_of("c-httpx") or kind == "socket/client" for kind, line in _flagged(agent))


def test_shared_clients_and_kept_pools_are_not_churn(agent: Any, http_server: Any, grpc_server: Any) -> None:
    url = f"http://{http_server.target}/"
    session = requests.Session()  # n-session
    pool = urllib3.PoolManager()  # n-pool
    channel = grpc.insecure_channel(grpc_server.target)  # n-channel
    client = httpx.Client()  # n-httpx
    call = channel.unary_unary(METHOD)
    for _ in range(3 * CALLS):
        assert session.get(url, timeout=10).status_code == 200  # n-session-get
        assert pool.request("GET", url).status == 200
        assert call(b"x", timeout=10) == b"x"
        assert client.get(url, timeout=10).status_code == 200
    sites = _sites(agent)
    assert sites[("requests.Session", _line_of("n-session"))].created == 1
    assert _flagged(agent) == [], "a shared Session/PoolManager/channel/httpx client reused for many calls"
    for c in (session, pool, channel, client):
        c.close() if not isinstance(c, urllib3.PoolManager) else c.clear()


def test_accepted_sockets_and_a_plateaued_pool_are_not_churn(agent: Any, tcp_server: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # n-listener
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()  # n-accept
            except OSError:
                return
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    # Another process connects and hangs up 3*CALLS times: the server side accepts and closes each.
    code = ("import socket, sys\nfor _ in range(int(sys.argv[2])):\n"
            "    socket.create_connection(('127.0.0.1', int(sys.argv[1]))).close()\n")
    subprocess.run([sys.executable, "-c", code, str(port), str(3 * CALLS)], check=True, timeout=60)
    # A pool that grows to 12 connections, then keeps them.
    pool: List[socket.socket] = []
    for _ in range(12):
        pool.append(socket.create_connection(tcp_server.address))  # n-pool-grow
    done.set()
    listener.close()
    t.join(10)
    sites = _sites(agent)
    accepted = sites[("socket/accepted", _line_of("n-accept"))]
    assert accepted.created == 3 * CALLS and accepted.churn is not None and accepted.churn.released == 3 * CALLS
    assert not accepted.churn.suspected, "accepted sockets are a server's normal traffic"
    grown = sites[("socket/client", _line_of("n-pool-grow"))]
    assert grown.live == 12 and grown.churn is not None and not grown.churn.suspected
    assert _flagged(agent) == []
    for s in pool:
        s.close()
