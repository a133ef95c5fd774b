"""The one ``os.register_at_fork`` of the agent: ordered hooks for before and after fork.

Also the guard for imports made on the agent's background threads. Python's per-module
import locks are not reset in a forked child: a fork while one of our threads is importing
(the snapshot code on the writer thread, opentelemetry on the exporter thread) would leave
that module's lock held forever in the child, and the child's own import of it would hang.
So background threads import inside ``import_guard()``, and the before-fork hook takes the
same lock first: a fork waits for such an import to finish; nothing else ever waits on it.
"""

from __future__ import annotations

import os
import threading

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, List

_before: List[Callable[[], None]] = []
_parent: List[Callable[[], None]] = []
_child: List[Callable[[], None]] = []
_registered = False
_import_guard = threading.RLock()


def import_guard() -> threading.RLock:
    """The lock a background thread holds while it imports (a fork waits for it)."""
    return _import_guard


def register(before: Callable[[], None] | None = None, parent: Callable[[], None] | None = None,
             child: Callable[[], None] | None = None) -> None:
    """Add fork hooks. ``before`` hooks run in reverse order of registration, like the os's."""
    global _registered
    if before is not None and before not in _before:
        _before.insert(0, before)
    if parent is not None and parent not in _parent:
        _parent.append(parent)
    if child is not None and child not in _child:
        _child.append(child)
    if not _registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_run_before, after_in_parent=_run_parent, after_in_child=_run_child)
        _registered = True


def _call(hooks: List[Callable[[], None]], where: str) -> None:
    for hook in list(hooks):
        try:
            hook()
        except Exception:
            from . import _log

            _log.internal_error(where)


def _run_before() -> None:
    _import_guard.acquire()  # first: a thread holding it may still need the other locks
    _call(_before, "fork (before)")


def _run_parent() -> None:
    _call(_parent, "fork (parent)")
    _import_guard.release()


def _run_child() -> None:
    global _import_guard
    _import_guard = threading.RLock()
    _call(_child, "fork (child)")
