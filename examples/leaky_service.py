"""A small service that leaks one HTTP client per request (the demo for connwatch).

``UserService.get_user`` opens a new ``http.client.HTTPConnection`` for every request and
keeps it in a per-user cache that is never evicted; the upstream keeps connections alive
(HTTP/1.1), so each request leaves a socket open. ``UserService.health`` uses one shared
connection: no leak. A load loop drives both; the upstream runs in its own process.

Run it under the agent: ``connwatch run -- python examples/leaky_service.py``, then
``connwatch report``.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import subprocess
import sys
from typing import Dict, Optional


class _Upstream(http.server.BaseHTTPRequestHandler):
    """The downstream service the app calls; keeps connections open like most servers."""

    protocol_version = "HTTP/1.1"
    timeout = 60

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class UserService:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._clients: Dict[int, http.client.HTTPConnection] = {}
        self._shared = http.client.HTTPConnection(host, port, timeout=5)

    def get_user(self, user_id: int) -> dict:
        # The leak: a new client per request, cached and never closed.
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        self._clients[user_id] = conn
        conn.request("GET", f"/users/{user_id}")
        return json.loads(conn.getresponse().read())

    def health(self) -> int:
        # The right way: one shared client, reused for every call.
        self._shared.request("GET", "/health")
        resp = self._shared.getresponse()
        resp.read()
        return resp.status


def serve() -> None:
    """Run the upstream (in its own process, without the agent) and print its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def start_upstream() -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNWATCH_")}
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


service: Optional[UserService] = None


def main() -> None:
    global service
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    upstream, port = start_upstream()
    try:
        service = UserService("127.0.0.1", port)
        for i in range(args.requests):
            service.get_user(i)
            if i % 10 == 0:
                service.health()
        print(f"served {args.requests} requests; the service now holds {len(service._clients)} open clients")
    finally:
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    main()
