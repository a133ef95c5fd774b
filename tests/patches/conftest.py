"""Fixtures for the client patch tests: real grpc servers (sync and aio) in their own process."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import Server

HERE = Path(__file__).resolve().parent


class GrpcServer(Server):
    """A grpc echo server (``sync`` or ``aio``) in its own process on 127.0.0.1."""

    script = HERE / "grpc_server.py"


@pytest.fixture(scope="session")
def grpc_server() -> Iterator[GrpcServer]:
    """A sync grpc server (``grpc.server``)."""
    s = GrpcServer("sync")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def grpc_aio_server() -> Iterator[GrpcServer]:
    """A ``grpc.aio`` server."""
    s = GrpcServer("aio")
    yield s
    s.stop()
