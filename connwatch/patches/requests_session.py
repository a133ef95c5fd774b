"""Patch for requests: each ``requests.Session`` is one client (its adapters' PoolManagers are
part of it). ``requests.get()`` and friends use a temporary Session closed on return, so they
leave nothing live. Released by ``close()`` (also what ``with`` calls) or garbage collection.
No upstream: a Session talks to any host.
"""

from __future__ import annotations

from typing import Tuple

from ._common import CLOSE, INIT, Patcher, Target

_TARGETS: Tuple[Target, ...] = (
    Target("requests.sessions", "Session", "__init__", INIT, "requests.Session"),
    Target("requests.sessions", "Session", "close", CLOSE, "requests.Session"),
)

_patcher = Patcher("requests", _TARGETS)


is_patched, patch, unpatch = _patcher.functions()
