"""The one ``os.register_at_fork`` of the agent: ordered hooks for before and after fork."""

from __future__ import annotations

import os
from typing import Callable, List

_before: List[Callable[[], None]] = []
_parent: List[Callable[[], None]] = []
_child: List[Callable[[], None]] = []
_registered = False


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
    _call(_before, "fork (before)")


def _run_parent() -> None:
    _call(_parent, "fork (parent)")


def _run_child() -> None:
    _call(_child, "fork (child)")
