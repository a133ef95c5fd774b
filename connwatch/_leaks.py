"""Leak signals: per-call-site growth over a window of recent samples, and fd exhaustion.

The snapshot writer feeds one sample per snapshot (live count per call site, open fds) into a
small ring per site. A call site is a *suspected leak* when its live count rises across the
window as a whole (a rank trend, so one spike or one flat stretch does not decide it) **and**
is still rising in the recent half of the window: a pool that grows, then plateaus, stops
being suspected once the plateau fills half the window. The cost of a sample and of an
assessment grows with the number of call sites (times the fixed window), never with clients.

Stdlib only: this is part of the core.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from ._callsite import SLOTS

WINDOW = 8  # samples kept per call site
MIN_SAMPLES = 4  # fewer samples than this never suggest a leak
MIN_RISE = 2  # a rise smaller than this (clients) over the window is noise
MIN_TREND = 0.6  # Kendall-style trend score over the window, in [-1, 1]
MAX_DRIVERS = 5

Point = Tuple[float, int]  # (time in seconds, live count)
Key = Tuple[str, Optional[str], str, int, str]  # (kind, role, file, line, function)


@dataclass(frozen=True, **SLOTS)
class Growth:
    """How one call site's live count moved over the recent window of samples."""

    suspected: bool
    per_min: float  # least-squares slope of the live count, clients per minute
    samples: int
    window_s: float


def slope(points: Sequence[Point]) -> float:
    """Least-squares slope (count per second) of ``points``; 0.0 when undefined."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den <= 0.0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / den


def trend(values: Sequence[int]) -> float:
    """Rank trend in [-1, 1]: (rising pairs - falling pairs) / all pairs (ties count 0).

    1.0 is a strictly rising series; a flat or noisy one scores near 0. O(n^2) in the
    window size, which is a small constant.
    """
    n = len(values)
    if n < 2:
        return 0.0
    s = 0
    for i in range(n - 1):
        vi = values[i]
        for j in range(i + 1, n):
            d = values[j] - vi
            s += (d > 0) - (d < 0)
    return s / (n * (n - 1) / 2)


def assess(points: Sequence[Point], min_samples: int = MIN_SAMPLES, min_rise: int = MIN_RISE,
           min_trend: float = MIN_TREND) -> Growth:
    """Decide whether a series of (time, live) samples looks like a leak."""
    n = len(points)
    rate = slope(points)
    span = points[-1][0] - points[0][0] if n >= 2 else 0.0
    suspected = False
    if n >= min_samples and rate > 0.0:
        values = [v for _, v in points]
        half = values[n // 2:]
        suspected = (
            values[-1] - values[0] >= min_rise
            and trend(values) >= min_trend
            # Still rising lately: a pool that filled up and plateaued is not a leak.
            and half[-1] > half[0]
            and trend(half) > 0.0
        )
    return Growth(suspected, rate * 60.0, n, span)


class Tracker:
    """Rings of recent samples per call site and for the process's open fds."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._sites: Dict[Key, Deque[Point]] = {}
        self._fds: Deque[Point] = deque(maxlen=window)

    def add(self, now: float, lives: Iterable[Tuple[Key, int]], fds_open: Optional[int]) -> None:
        """Record one sample: the live count of every call site, and the open fds."""
        with self._lock:
            seen = set()
            for key, live in lives:
                seen.add(key)
                ring = self._sites.get(key)
                if ring is None:
                    ring = self._sites[key] = deque(maxlen=self.window)
                ring.append((now, live))
            for key in [k for k in self._sites if k not in seen]:
                del self._sites[key]  # a site the registry forgot (after clear())
            if fds_open is not None:
                self._fds.append((now, fds_open))

    def growth(self, key: Key, current: Optional[Point] = None) -> Optional[Growth]:
        """The growth of one call site over its window (plus ``current``, if newer); None if unseen."""
        with self._lock:
            ring = self._sites.get(key)
            points = list(ring) if ring is not None else []
        if current is not None and (not points or current[0] > points[-1][0]):
            points.append(current)
            points = points[-self.window:]
        if not points:
            return None
        return assess(points)

    def fd_points(self, current: Optional[Point] = None) -> List[Point]:
        """The open-fd samples of the window (plus ``current``, if newer)."""
        with self._lock:
            points = list(self._fds)
        if current is not None and (not points or current[0] > points[-1][0]):
            points.append(current)
            points = points[-self.window:]
        return points

    def reset(self) -> None:
        """Forget every sample (a forked child, or the agent restarted)."""
        with self._lock:
            self._sites.clear()
            self._fds.clear()


def fd_exhaustion(points: Sequence[Point], limit: Optional[int],
                  drivers: Iterable[Tuple[Key, Growth]]) -> Dict[str, Any]:
    """Time until the fd limit at the current rate, and the call sites that drive it.

    ``eta_s`` is None when the fd count is not rising across the window (or the limit is
    unknown). ``drivers`` lists the call sites whose live count rises, fastest first.
    """
    rate = slope(points)
    n = len(points)
    eta: Optional[float] = None
    rising = n >= 2 and rate > 0.0 and points[-1][1] > points[0][1] and trend([v for _, v in points]) > 0.0
    if rising and limit:
        eta = max(0.0, (limit - points[-1][1]) / rate)
    growing = sorted(((k, g) for k, g in drivers if g.per_min > 0.0), key=lambda kg: -kg[1].per_min)
    total = sum(g.per_min for _, g in growing) or 1.0
    return {
        "eta_s": None if eta is None else round(eta, 1),
        "rate_per_s": round(rate, 4),
        "window_s": round(points[-1][0] - points[0][0], 3) if n >= 2 else 0.0,
        "samples": n,
        "drivers": [
            {"kind": k[0], "role": k[1], "file": k[2], "line": k[3], "function": k[4],
             "growth_per_min": round(g.per_min, 3), "suspected_leak": g.suspected,
             "share": round(g.per_min / total, 3)}
            for k, g in growing[:MAX_DRIVERS]
        ],
    }


# The process's tracker: fed by the snapshot writer, read by every snapshot.
TRACKER = Tracker()
