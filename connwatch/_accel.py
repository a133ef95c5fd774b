"""The optional C hot path (``connwatch._speedups``), or None for the pure-Python one.

The wheel carries the extension where it could be compiled; both paths behave the same (the
tests run on both). ``CONNWATCH_PURE_PYTHON=1`` forces the Python path.
"""

from __future__ import annotations

import os

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Optional

PURE_ENV = "CONNWATCH_PURE_PYTHON"


def _load() -> Optional[ModuleType]:
    if os.environ.get(PURE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None  # not built here (no compiler, or another interpreter): the Python path
    except Exception:
        from . import _log

        _log.internal_error("loading connwatch._speedups (using the Python path)")
        return None
    return _speedups


speedups = _load()
