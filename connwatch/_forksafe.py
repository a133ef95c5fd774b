"""The one ``os.register_at_fork`` of the agent: ordered hooks for before and after fork.

Also the guard for imports made on the agent's background threads. Python's per-module
import locks are not reset in a forked child: a fork while one of our threads is importing
(the snapshot code on the writer thread, opentelemetry on the exporter thread) would leave
that module's lock held forever in the child, and the child's own import of it would hang.
So background threads import inside ``import_guard()``, and the before-fork hook takes the
same lock first: a fork waits for such an import to finish; nothing else ever waits on it.

CPython 3.12+ warns at ``os.fork()`` in a process that has more than one thread (a
DeprecationWarning, shown by default in ``__main__``). The agent's threads are fork-safe (the
guard above; a child resets its counts and starts its own), so when every thread but the forking
one is the agent's, that warning is hidden for that one fork: an app forking from a single thread
sees what it saw without the agent. Any other thread (the app's, grpc's C threads) leaves it shown.
"""

from __future__ import annotations

import os
import sys
import threading

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, List, Optional

_before: List[Callable[[], None]] = []
_parent: List[Callable[[], None]] = []
_child: List[Callable[[], None]] = []
_registered = False
_import_guard = threading.RLock()
_FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork"
_AGENT_THREAD_PREFIX = "connwatch-"  # the names of the threads the agent starts
_hidden: Optional[Any] = None  # the warnings filter set for the fork under way


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
    _call([_hide_fork_warning], "fork (before)")


def _run_parent() -> None:
    # (the fork warning filter stays: 3.13 warns after these hooks; it takes itself out)
    _call(_parent, "fork (parent)")
    _import_guard.release()


def _run_child() -> None:
    global _import_guard
    _import_guard = threading.RLock()
    _call([_show_fork_warning], "fork (child)")
    _call(_child, "fork (child)")


def _agent_threads() -> int:
    """How many live Python threads are the agent's (its own, and those the exporters made)."""
    from . import _callsite

    idents = _callsite._agent_threads
    return sum(1 for t in threading.enumerate()
               if t.ident in idents or t.name.startswith(_AGENT_THREAD_PREFIX))


class _ForkWarning:
    """The message test of the filter set for one fork: matches CPython's multi-threaded fork
    warning, then takes its filter out (3.12 warns before the after-fork hooks, 3.13 after them)."""

    pattern = _FORK_WARNING  # as a compiled pattern has

    def match(self, text: str) -> bool:
        import re

        if re.match(_FORK_WARNING, text) is None:
            return False
        _show_fork_warning()
        return True


def _hide_fork_warning() -> None:
    """Before a fork: ignore CPython's multi-threaded fork warning if only the agent's threads
    cause it (the process' threads, as CPython counts them on Linux, are the forking one and ours)."""
    global _hidden
    _show_fork_warning()  # one a fork that did not warn left (its threads changed meanwhile)
    if sys.version_info < (3, 12):
        return
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return
    if threads <= 1 or threads != 1 + _agent_threads():
        return
    import warnings

    entry = ("ignore", _ForkWarning(), DeprecationWarning, None, 0)
    filters: Any = warnings.filters  # a list (typed as a sequence)
    filters.insert(0, entry)
    warnings._filters_mutated()  # type: ignore[attr-defined]  # as warnings.filterwarnings does
    _hidden = entry


def _show_fork_warning() -> None:
    """Remove the filter :func:`_hide_fork_warning` set, if it is still there."""
    global _hidden
    entry, _hidden = _hidden, None
    if entry is None:
        return
    import warnings

    filters: Any = warnings.filters
    try:
        filters.remove(entry)
    except ValueError:
        return  # the app replaced the list meanwhile
    warnings._filters_mutated()  # type: ignore[attr-defined]
