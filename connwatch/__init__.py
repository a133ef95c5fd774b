"""connwatch: live network clients per call site, from inside the process.

    import connwatch
    connwatch.enable()
    ...
    snap = connwatch.snapshot()
    for stat in snap.statistics("callsite")[:10]:
        print(stat.live, stat.label(), stat.site)

Set ``CONNWATCH_ENABLED=1`` to load the agent in every Python process of the environment
with no code change. Nothing here imports a third-party package.

PYTEST_DONT_REWRITE: the agent is imported at interpreter start (before pytest) and ships a
pytest plugin, so pytest would warn that it cannot rewrite this package; under
``filterwarnings = error`` that warning stops the whole test session.
"""

from __future__ import annotations

from ._callsite import CallSite
from ._limits import ClientCapExceeded

# The snapshot and guard types load on first use (PEP 562): starting the agent from the
# .pth hook must not import json, dataclasses and typing (milliseconds each).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

    from ._guard import Churned, ChurnError, Leak, LeakError, guard
    from ._snapshot import Snapshot, SnapshotError, Statistic, StatisticDiff

_LAZY = {
    "Snapshot": "_snapshot", "SnapshotError": "_snapshot", "Statistic": "_snapshot",
    "StatisticDiff": "_snapshot", "Leak": "_guard", "LeakError": "_guard", "guard": "_guard",
    "ChurnError": "_guard", "Churned": "_guard",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'connwatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"connwatch.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"

__all__ = [
    "CallSite",
    "ChurnError",
    "Churned",
    "ClientCapExceeded",
    "Leak",
    "LeakError",
    "Snapshot",
    "SnapshotError",
    "Statistic",
    "StatisticDiff",
    "__version__",
    "disable",
    "enable",
    "guard",
    "is_enabled",
    "snapshot",
    "snapshot_path",
]


def enable(**overrides: object) -> bool:
    """Start the agent in this process (a no-op when it already runs).

    Keyword arguments override the ``CONNWATCH_*`` environment settings (``dir``,
    ``snapshot_interval``, ``exporter``, ``cap``, ``cap_per_callsite``, ``cap_per_upstream``,
    ``cap_mode``, ``disabled_patches``, ``library_paths``, ``app_paths``,
    ``traceback_depth``, ``span_events``, ``retainers``, ``service``). Returns whether the agent runs.
    """
    from . import bootstrap

    return bootstrap.start(**overrides)


def disable() -> None:
    """Stop the agent: restore every patched original and forget all counts."""
    from . import bootstrap

    bootstrap.stop()


def is_enabled() -> bool:
    """Whether the agent runs in this process."""
    from . import bootstrap

    return bootstrap.is_enabled()


def snapshot(retainers: bool = False, **retainer_limits: Any) -> Snapshot:
    """Take a snapshot of the live clients now (cost grows with call sites, not clients).

    ``retainers=True`` adds, per call site with live clients, a few paths from a module global,
    class attribute or thread frame local to one of its clients (``Statistic.retainers``): a
    bounded search of the heap (``max_objects``, default 200,000; ``max_ms``, default 500; the
    ``retainers_search`` entry of :meth:`Snapshot.to_dict` says what it cost and if it stopped).
    """
    from . import _snapshot

    return _snapshot.take(retainers=retainers, **retainer_limits)


def snapshot_path() -> Optional[str]:
    """The snapshot file this process writes, or None when the agent or its files are off."""
    from . import bootstrap

    return bootstrap.snapshot_path()

