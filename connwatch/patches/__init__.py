"""The patch table and its installer: each target library is patched when the app imports it.

Every patch module has the same contract: ``patch(module)``, ``unpatch()``, ``is_patched()``
and a ``_TARGETS`` table that both walk. connwatch never imports a target library itself.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .. import _importhook, _log

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterable, Tuple

# patch name -> (module whose import triggers it, "module:attr" of the patch module)
PATCHES: Dict[str, Tuple[str, str]] = {
    "socket": ("socket", "connwatch.patches.stdlib_socket"),
    "grpc": ("grpc", "connwatch.patches.grpc_channel"),
    "urllib3": ("urllib3.poolmanager", "connwatch.patches.urllib3_pool"),  # before urllib3 makes its default pool
    "requests": ("requests", "connwatch.patches.requests_session"),
    "httpx": ("httpx", "connwatch.patches.httpx_client"),
    "aiohttp": ("aiohttp", "connwatch.patches.aiohttp_session"),
    "gevent": ("gevent._socket3", "connwatch.patches.gevent_socket"),  # gevent's socket class
    "uvloop": ("uvloop", "connwatch.patches.uvloop_loop"),  # libuv's own connections
}

_installed: Dict[str, Callable[[ModuleType], None]] = {}


def _load(name: str) -> Any:
    return importlib.import_module(PATCHES[name][1])


def _hook_for(name: str) -> Callable[[ModuleType], None]:
    def hook(module: ModuleType) -> None:
        try:
            _load(name).patch(module)
        except Exception:
            _log.internal_error(f"patching {name}")

    return hook


def install(disabled: Iterable[str] = ()) -> Tuple[str, ...]:
    """Register every patch not in ``disabled``; returns the names registered."""
    skip = {d.strip().lower() for d in disabled}
    unknown = skip - set(PATCHES) - {"grpc", "urllib3", "requests", "httpx", "aiohttp"}
    if unknown:
        _log.warn_once("patches-unknown", "CONNWATCH_DISABLED_PATCHES names unknown patches %s; known: %s",
                       ", ".join(sorted(unknown)), ", ".join(PATCHES))
    done = []
    for name, (target, _mod) in PATCHES.items():
        if name in skip or name in _installed:
            continue
        hook = _hook_for(name)
        _installed[name] = hook
        _importhook.when_imported(target, hook)
        done.append(name)
    return tuple(done)


def uninstall() -> None:
    """Remove the import hooks and restore every patched original."""
    for name, hook in list(_installed.items()):
        _importhook.discard(PATCHES[name][0], hook)
        mod = sys.modules.get(PATCHES[name][1])
        if mod is not None:
            try:
                mod.unpatch()
            except Exception:
                _log.internal_error(f"unpatching {name}")
        del _installed[name]


def installed() -> Tuple[str, ...]:
    """Names of the patches currently registered."""
    return tuple(_installed)
