"""The agent's own logging: one record per problem, never an exception into the app."""

from __future__ import annotations

import sys
import time

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LOGGER_NAME = "connwatch"

# Keys already reported. A set add/lookup is atomic under the GIL, and a duplicate warning
# in a race is harmless, so no lock here (a lock would be one more thing held at fork).
_seen: set[str] = set()
_last: dict[str, float] = {}


def _logger() -> Any:
    # logging is imported lazily: it costs milliseconds at start-up and most runs never warn.
    import logging

    return logging.getLogger(LOGGER_NAME)


def warn_once(key: str, message: str, *args: object) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key in _seen:
        return
    _seen.add(key)
    try:
        _logger().warning("connwatch: " + message, *args)
    except Exception:  # pragma: no cover - logging itself broken
        pass


def warn_every(key: str, period_s: float, message: str, *args: object) -> bool:
    """Log at most once per ``period_s`` seconds for ``key``; returns whether it logged."""
    now = time.monotonic()
    last = _last.get(key)
    if last is not None and now - last < period_s:
        return False
    _last[key] = now
    try:
        _logger().warning("connwatch: " + message, *args)
    except Exception:  # pragma: no cover
        pass
    return True


def internal_error(where: str) -> None:
    """Report the exception being handled, once per ``where``; never raises.

    Called from ``except Exception`` blocks in wrappers: the app must not see agent errors.
    """
    if where in _seen:
        return
    _seen.add(where)
    try:
        _logger().warning(
            "connwatch: internal error in %s, ignored (the app is unaffected)", where, exc_info=sys.exc_info()
        )
    except Exception:  # pragma: no cover
        pass


def reset() -> None:
    """Forget what was reported (tests)."""
    _seen.clear()
    _last.clear()
