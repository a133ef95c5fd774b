"""Real loopback servers for tests, run in their own process (so their sockets are not counted).

    python tests/servers.py tcp     -> prints the port; accepts and echoes until killed
    python tests/servers.py http    -> prints the port; HTTP/1.1 keep-alive server
    python tests/servers.py tls HOST CERT KEY -> prints the port; TLS echo server
"""

from __future__ import annotations

import http.server
import os
import socketserver
import ssl
import sys


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


class _Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def do_GET(self) -> None:
        body = b'{"ok": true, "path": "' + self.path.encode() + b'"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


class _TCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _HTTP(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    for k in list(os.environ):
        if k.startswith("CONNWATCH_"):
            del os.environ[k]
    kind = sys.argv[1]
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    server: socketserver.TCPServer
    if kind in ("tcp", "tls"):
        if ":" in host:
            _TCP.address_family = __import__("socket").AF_INET6
        server = _TCP((host, 0), _Echo)
        if kind == "tls":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(sys.argv[3], sys.argv[4])
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
    elif kind == "http":
        server = _HTTP((host, 0), _Http)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
