"""Facts about this process that snapshots carry (start time, service, cap settings).

Kept apart from ``_snapshot`` so that starting the agent does not import json, dataclasses
and the leak tracker: those load with the first snapshot, on the writer's thread.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional


class _Process:
    started: float = time.time()
    service: Optional[str] = None
    cap_info: Optional[Callable[[], Dict[str, Any]]] = None  # the snapshot's "cap" object


def set_process(service: Optional[str] = None, started: Optional[float] = None) -> None:
    """Record the service name and start time that snapshots of this process report."""
    _Process.service = service
    if started is not None:
        _Process.started = started


def set_cap_info(provider: Optional[Callable[[], Dict[str, Any]]]) -> None:
    """Set the callable that describes the cap settings and hits for snapshots."""
    _Process.cap_info = provider


def started() -> float:
    """When this process (or, in a forked child, the fork) started, in epoch seconds."""
    return _Process.started


def service() -> Optional[str]:
    """The service name snapshots report."""
    return _Process.service


def cap_info() -> Dict[str, Any]:
    """The snapshot's ``cap`` object (empty when no provider is set or it fails)."""
    provider = _Process.cap_info
    if provider is None:
        return {}
    try:
        return dict(provider())
    except Exception:
        return {}


_hostname: Optional[str] = None


def hostname() -> str:
    """This host's name (cached; gethostname opens no socket)."""
    global _hostname
    if _hostname is None:
        import socket  # imported here: the app may never import socket at all

        try:
            _hostname = socket.gethostname() or "localhost"
        except OSError:  # pragma: no cover
            _hostname = "localhost"
    return _hostname


def after_fork_child() -> None:
    """In a forked child: its own start time."""
    _Process.started = time.time()
