"""Patch for gevent's cooperative socket class (what ``socket.socket`` is after
``gevent.monkey.patch_all()``).

``gevent._socket3.socket`` is not a subclass of the stdlib ``socket.socket``: it holds a
``_socket.socket`` of its own, so the stdlib patch never sees it and a gevent app would show no
sockets at all. Its methods have the stdlib's names and signatures (``__init__(family, type,
proto, fileno)``, ``_real_close(_ss)``, ``detach``, ``connect``, ``connect_ex``, ``listen``,
``accept``), so the stdlib patch's plain-function wrappers are reused as they are: same roles,
same hand-overs, same cost. ``socketpair`` builds its ends on descriptors, which the
``__init__`` wrapper classifies by inspecting them (unnamed AF_UNIX peer: ``pair``).

Triggered by the import of ``gevent._socket3`` (``gevent.socket`` and ``gevent.monkey`` import
it); connwatch never imports gevent itself.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Tuple

from . import stdlib_socket

MODULE = "gevent._socket3"
_MISSING = object()

# (attribute of the gevent socket class) in the order the stdlib patch wraps them
_TARGETS: Tuple[str, ...] = ("__init__", "_real_close", "detach", "connect", "connect_ex", "listen", "accept")

# attribute -> what the class's own __dict__ had (connect, connect_ex and listen are inherited)
_originals: Dict[str, Any] = {}
_installed: Dict[str, Any] = {}
_owner: Any = None


def is_patched() -> bool:
    """Whether gevent's socket class is wrapped."""
    return bool(_installed)


def patch(module: Any = None) -> None:
    """Wrap gevent's socket class (idempotent)."""
    global _owner
    if _installed:
        return
    mod = module if module is not None and hasattr(module, "socket") else sys.modules.get(MODULE)
    owner = getattr(mod, "socket", None) if mod is not None else None
    if not isinstance(owner, type) or getattr(owner.__dict__.get("__init__"), "__connwatch_patch__", False):
        # Not there, or already wrapped: an agent started after monkey.patch_all() found
        # gevent's class as ``socket.socket`` and the stdlib patch wrapped it.
        return
    orig: Dict[str, Any] = {name: getattr(owner, name) for name in _TARGETS}
    orig["socketpair"] = getattr(mod, "socketpair", None)  # not wrapped (see the module docstring)
    wrappers = stdlib_socket._make_wrappers(orig)
    for name in _TARGETS:
        _originals[name] = owner.__dict__.get(name, _MISSING)
    for name in _TARGETS:
        wrapper = wrappers[name]
        wrapper.__connwatch_patch__ = True
        setattr(owner, name, wrapper)
        _installed[name] = wrapper
    _owner = owner


def unpatch() -> None:
    """Restore the exact originals (idempotent); an attribute re-wrapped by someone else after
    us is left alone."""
    global _owner
    owner = _owner
    if owner is None:
        return
    for name, wrapper in list(_installed.items()):
        if owner.__dict__.get(name, _MISSING) is not wrapper:
            continue
        original = _originals.get(name, _MISSING)
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _installed.clear()
    _originals.clear()
    _owner = None
