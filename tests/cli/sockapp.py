"""A small app for the CLI tests: opens loopback connections in a pattern, then waits.

    python sockapp.py MODE PORT [N]
      leak   one new connection every 0.1 s, never closed (a leak)
      pool   grows to N connections (default 5), then keeps them (a pool that plateaus)
      hold   opens N connections at once and keeps them
      churn  opens and closes a connection every 0.05 s (nothing stays)
Prints "ready" once started; exits normally (final snapshot) on "exit" or EOF on stdin.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

held = []


def connect_leaky(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def connect_pooled(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def connect_held(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def connect_churn(port: int) -> None:
    socket.create_connection(("127.0.0.1", port)).close()


def work(mode: str, port: int, n: int) -> None:
    if mode == "hold":
        for _ in range(n):
            held.append(connect_held(port))
        return
    while True:
        if mode == "leak":
            held.append(connect_leaky(port))
        elif mode == "pool" and len(held) < n:
            held.append(connect_pooled(port))
        elif mode == "churn":
            connect_churn(port)
        time.sleep(0.1 if mode != "churn" else 0.05)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    if mode == "hold":
        work(mode, port, n)
    else:
        threading.Thread(target=work, args=(mode, port, n), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "exit":
            break


if __name__ == "__main__":
    main()
