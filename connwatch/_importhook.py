"""Post-import hooks: run a callback when a module has been imported (stdlib only).

wrapt's ``register_post_import_hook`` does this too, but importing wrapt 2 costs ~50 ms
(it imports asyncio, inspect and importlib.metadata), which would land on every agent start;
connwatch does not use wrapt at all (the patches install plain functions).
This finder costs nothing until a watched module is imported. A hook that raises is logged
and swallowed: it must never break the app's import.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

from . import _log

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from typing import Any, Callable, Dict, List, Optional, Sequence

    Hook = Callable[[ModuleType], None]

_hooks: Dict[str, List[Hook]] = {}
_lock = threading.RLock()
_busy = threading.local()


def _run_hooks(name: str, module: ModuleType) -> None:
    for hook in list(_hooks.get(name, ())):
        try:
            hook(module)
        except Exception:
            _log.internal_error(f"import hook for {name}")


class _Loader:
    """Wraps the real loader: exec the module, restore the real loader, then run hooks."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)

    def create_module(self, spec: ModuleSpec) -> Optional[ModuleType]:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        try:
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        except Exception:
            pass
        self._loader.exec_module(module)
        _run_hooks(self._name, sys.modules.get(self._name, module))


class _Finder:
    """A meta path finder (duck-typed: importlib.abc costs milliseconds to import)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Optional[ModuleSpec]:
        if fullname not in _hooks or getattr(_busy, fullname, False):
            return None
        setattr(_busy, fullname, True)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        except Exception:
            return None
        finally:
            setattr(_busy, fullname, False)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname)  # type: ignore[assignment]
        return spec


_finder = _Finder()


def when_imported(name: str, hook: Hook) -> None:
    """Call ``hook(module)`` once ``name`` is imported; at once if it already is."""
    with _lock:
        _hooks.setdefault(name, [])
        if hook not in _hooks[name]:
            _hooks[name].append(hook)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__spec__", None) is not None and not _initialising(module):
        try:
            hook(module)
        except Exception:
            _log.internal_error(f"import hook for {name}")


def _initialising(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def discard(name: str, hook: Hook) -> None:
    """Remove a hook registered with :func:`when_imported`."""
    with _lock:
        hooks = _hooks.get(name)
        if hooks and hook in hooks:
            hooks.remove(hook)
        if hooks is not None and not hooks:
            del _hooks[name]
        if not _hooks and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
