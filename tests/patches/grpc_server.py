"""A real grpc echo server for the patch tests, run in its own process.

    python tests/patches/grpc_server.py sync|aio   -> prints the port; serves /echo.Echo/Call

Generic handlers with raw bytes (no generated protos): the reply is the request.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import grpc

SERVICE = "echo.Echo"
METHOD = f"/{SERVICE}/Call"


def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _aecho(request: bytes, context: Any) -> bytes:
    return request


def _handler(fn: Any) -> Any:
    return grpc.method_handlers_generic_handler(SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(fn)})


def serve_sync() -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_handler(_echo),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


async def serve_aio() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(_aecho),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def main() -> None:
    for k in list(os.environ):
        if k.startswith("CONNWATCH_"):
            del os.environ[k]
    if sys.argv[1] == "sync":
        serve_sync()
    else:
        asyncio.run(serve_aio())


if __name__ == "__main__":
    main()
