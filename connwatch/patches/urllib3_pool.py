"""Patch for urllib3: PoolManager, ProxyManager and connection pools made by the app.

What is one client:

* a ``PoolManager``/``ProxyManager`` the app (or a library other than requests) builds;
* an ``HTTPConnectionPool``/``HTTPSConnectionPool`` built *directly* by such code. The pools a
  manager makes for itself (``connection_from_*``) are part of the manager: that method runs
  with the nesting depth raised, so they are not counted again;
* objects requests builds inside its own code (the adapters' managers, including the
  ProxyManagers an adapter makes lazily) are part of the ``requests.Session``;
* the module-level default pool urllib3 makes on import (``urllib3.request()``) is tracked at
  urllib3's own line, marked ``library``, so it is never blamed on the app's import line.

The patch is triggered by ``urllib3.poolmanager`` (which loads ``connectionpool`` first), so
the classes are wrapped before ``urllib3/__init__`` builds that default pool.

Release never depends on ``close()``: urllib3 drops pools on ``clear()``, on eviction from a
manager and by garbage collection. Pools are released by ``close()`` or collection; managers
by ``clear()`` (also what their ``with`` block calls) or collection.
"""

from __future__ import annotations

from types import FrameType
from typing import Any, Dict, Optional, Tuple

from ._common import CLOSE, INIT, LIBRARY, NEST, SKIP, TRACK, Patcher, Target, arg, host_port, url_upstream

POOLS = "urllib3.connectionpool"
MANAGERS = "urllib3.poolmanager"

_TARGETS: Tuple[Target, ...] = (
    Target(POOLS, "HTTPConnectionPool", "__init__", INIT, "urllib3.HTTPConnectionPool"),
    Target(POOLS, "HTTPSConnectionPool", "__init__", INIT, "urllib3.HTTPSConnectionPool"),
    Target(POOLS, "HTTPConnectionPool", "close", CLOSE, "urllib3.HTTPConnectionPool"),
    Target(MANAGERS, "PoolManager", "__init__", INIT, "urllib3.PoolManager"),
    Target(MANAGERS, "ProxyManager", "__init__", INIT, "urllib3.ProxyManager"),
    Target(MANAGERS, "PoolManager", "clear", CLOSE, "urllib3.PoolManager"),
    Target(MANAGERS, "PoolManager", "connection_from_pool_key", NEST),
)

# Packages whose own code builds urllib3 objects as parts of their own tracked clients.
_OWNERS = ("requests",)


def _pool(default_port: int) -> Any:
    def upstream(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
        host = arg(args, kwargs, 0, "host")
        if isinstance(host, str):
            host = host.strip("[]")
        port = arg(args, kwargs, 1, "port")
        return host_port(host, port if port is not None else default_port)

    return upstream


def _proxy(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    url = arg(args, kwargs, 0, "proxy_url")
    if hasattr(url, "host") and hasattr(url, "port") and not isinstance(url, str):  # a pool
        return host_port(str(url.host).strip("[]"), url.port)
    return url_upstream(url)


def _module_of(frame: FrameType) -> str:
    name = frame.f_globals.get("__name__")
    return name if isinstance(name, str) else ""


def _is_pkg(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def _rule(frame: FrameType) -> int:
    """TRACK, SKIP (part of a requests object) or LIBRARY (urllib3's module-level default pool)."""
    name = _module_of(frame)
    if _is_pkg(name, "urllib3") and frame.f_code.co_name == "<module>":
        return LIBRARY
    f: Optional[FrameType] = frame
    while f is not None and _is_pkg(_module_of(f), "urllib3"):
        f = f.f_back
    if f is not None and any(_is_pkg(_module_of(f), pkg) for pkg in _OWNERS):
        return SKIP
    return TRACK


_patcher = Patcher(
    "urllib3",
    _TARGETS,
    upstream={
        "urllib3.HTTPConnectionPool": _pool(80),
        "urllib3.HTTPSConnectionPool": _pool(443),
        "urllib3.ProxyManager": _proxy,
    },
    rule=_rule,
)


is_patched, patch, unpatch = _patcher.functions()
