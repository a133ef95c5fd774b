"""A small app for the canary tests: loopback connections made at one line, then held.

    python canaryapp.py hold PORT N          opens N connections at once and keeps them
    python canaryapp.py slow PORT N SECONDS  opens one every SECONDS until it holds N (a slow leak)
    python canaryapp.py churn PORT N SECONDS holds N, and opens and closes one every SECONDS at
                                             another line (a client per call)
With CONNWATCH_EXPORTER=prometheus it waits for its /metrics listener first. Prints "ready";
exits normally (final snapshot) on "exit" or EOF on stdin.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

held = []


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def connect_per_call(port: int) -> None:
    socket.create_connection(("127.0.0.1", port)).close()


def churn(port: int, every: float) -> None:
    while True:
        connect_per_call(port)
        time.sleep(every)


def grow(port: int, n: int, every: float) -> None:
    while len(held) < n:
        held.append(connect(port))
        if len(held) < n:
            time.sleep(every)


def main() -> None:
    mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode in ("hold", "churn"):  # before anything can be scraped: held from the start
        grow(port, n, 0.0)
    if "prometheus" in os.environ.get("CONNWATCH_EXPORTER", ""):
        from connwatch import exporters

        assert exporters.wait_ready(20)
    if mode == "slow":
        threading.Thread(target=grow, args=(port, n, float(sys.argv[4])), daemon=True).start()
    elif mode == "churn":
        threading.Thread(target=churn, args=(port, float(sys.argv[4])), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "exit":
            break


if __name__ == "__main__":
    main()
