"""A final snapshot for multiprocessing children, which end with ``os._exit`` (no atexit).

A child started by ``multiprocessing`` with the fork or forkserver method runs its target, then
``multiprocessing.util._exit_function()`` (the module's own at-exit finalizers), then
``os._exit``: interpreter ``atexit`` hooks, and so the agent's final snapshot, never run. A
short-lived worker would leave no file at all, or one that misses its last seconds.

multiprocessing's own public hooks give the same moment: ``util.register_after_fork`` runs a
function at the start of every child (fork, spawn and forkserver alike), where we register a
``util.Finalize`` with the lowest exit priority, so it runs after the app's own finalizers.
Nothing here imports multiprocessing: the hook is armed when the app imports it. Stdlib only.
"""

from __future__ import annotations

from types import ModuleType

from . import _importhook, _log

TYPE_CHECKING = False  # typing costs ~5 ms at interpreter start; annotations are strings here
if TYPE_CHECKING:
    from typing import Callable, Optional

MODULE = "multiprocessing.util"
# Finalizers run from the highest priority down: this one after every finalizer of the app's.
EXIT_PRIORITY = -(2**31)


class _Token:
    """The key object of our entry in multiprocessing's after-fork registry (a weak mapping)."""

    __slots__ = ("__weakref__",)


_token: Optional[_Token] = None
_at_exit: Optional[Callable[[], None]] = None


def install(at_exit: Callable[[], None]) -> None:
    """Call ``at_exit()`` when a multiprocessing child ends normally (idempotent)."""
    global _at_exit
    _at_exit = at_exit
    _importhook.when_imported(MODULE, _armed)


def uninstall() -> None:
    """Forget the hook; children started later get no final write from us."""
    global _at_exit, _token
    _importhook.discard(MODULE, _armed)
    _at_exit = None
    _token = None  # its after-fork entry goes with it (the registry holds it weakly)


def _armed(util: ModuleType) -> None:
    global _token
    if _token is None:
        token = _Token()
        util.register_after_fork(token, _child_started)
        _token = token


def _child_started(_token: object) -> None:
    # In the child, before its target runs (multiprocessing catches and logs what we raise;
    # we raise nothing).
    try:
        import multiprocessing.util as util

        util.Finalize(None, _child_exiting, exitpriority=EXIT_PRIORITY)
    except Exception:
        _log.internal_error("multiprocessing child start")


def _child_exiting() -> None:
    at_exit = _at_exit
    if at_exit is None:
        return
    try:
        at_exit()
    except Exception:
        _log.internal_error("multiprocessing child exit")
