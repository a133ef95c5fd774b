"""Fixtures for the client patch tests: real grpc servers (sync and aio) in their own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import clean_env

HERE = Path(__file__).resolve().parent


class GrpcServer:
    """A grpc echo server in its own process on 127.0.0.1."""

    def __init__(self, mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "grpc_server.py"), mode],
                                     stdout=subprocess.PIPE, text=True, env=clean_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            self.proc.kill()
            raise RuntimeError(f"grpc {mode} server did not start")
        self.port = int(line)
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


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
