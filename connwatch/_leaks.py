"""Leak and churn signals: per-call-site growth and creation rate over a window of recent
samples, client lifetimes, and fd exhaustion.

The snapshot writer feeds one sample per snapshot (live count per call site, open fds) into a
small ring per site. A call site is a *suspected leak* when its live count rises across the
window as a whole (a rank trend, so one spike or one flat stretch does not decide it) **and**
is still rising in the recent half of the window: a pool that grows, then plateaus, stops
being suspected once the plateau fills half the window. The cost of a sample and of an
assessment grows with the number of call sites (times the fixed window), never with clients.

A call site is *suspected churn* (a client built per call, the seed's first remedy broken) when
it keeps creating clients that are closed or collected soon after: over the window it created
at least ``CHURN_MIN_CREATED`` clients at ``CHURN_MIN_RATE`` per minute or more, and the median
lifetime of the ones it released (the registry's lifetime buckets, filled at release) is under
``CHURN_MAX_LIFETIME_S``. A shared client or a pool opened once creates too few; a pool that
grows then plateaus releases none; accepted server sockets, listeners and socket pairs are a
server's normal traffic and never judged.

Stdlib only: this is part of the core.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ._callsite import SLOTS
from ._registry import LIFE_AT_10S, life_bucket_bounds

WINDOW = 8  # samples kept per call site
MIN_SAMPLES = 4  # fewer samples than this never suggest a leak
MIN_RISE = 2  # a rise smaller than this (clients) over the window is noise
MIN_TREND = 0.6  # Kendall-style trend score over the window, in [-1, 1]
MAX_DRIVERS = 5
CHURN_MIN_CREATED = 10  # clients created in the window, at least
CHURN_MIN_RATE = 6.0  # clients created per minute, at least
CHURN_MIN_RELEASED = 5  # released clients whose lifetimes are known, at least
CHURN_MAX_LIFETIME_S = 10.0  # median lifetime below this (bucket bound: 10 s)
CHURN_EXEMPT_ROLES = frozenset({"accepted", "listener", "pair"})

Point = Tuple[float, int]  # (time in seconds, live count)
Key = Tuple[str, Optional[str], str, int, str]  # (kind, role, file, line, function)


@dataclass(frozen=True, **SLOTS)
class Growth:
    """How one call site's live count moved over the recent window of samples."""

    suspected: bool
    per_min: float  # least-squares slope of the live count, clients per minute
    samples: int
    window_s: float


@dataclass(frozen=True, **SLOTS)
class Churn:
    """How fast one call site creates clients and how long they live."""

    suspected: bool
    created_per_min: float  # over the window (or the site's life, before the window has 2 samples)
    created: int  # clients created in that span
    span_s: float
    released: int  # released clients whose lifetime is known (since start or fork)
    median_lifetime_s: Optional[float]  # None before the first release
    short_lived: int  # released within CHURN_MAX_LIFETIME_S

    def to_dict(self) -> Dict[str, Any]:
        """The snapshot's ``churn`` object."""
        return {"created_per_min": round(self.created_per_min, 3), "created_in_window": self.created,
                "window_s": round(self.span_s, 3), "released": self.released,
                "median_lifetime_s": None if self.median_lifetime_s is None else round(self.median_lifetime_s, 6),
                "short_lived": self.short_lived}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], suspected: bool) -> Churn:
        """Read back a snapshot's ``churn`` object (missing fields: 0 / None)."""
        med = d.get("median_lifetime_s")
        return cls(bool(suspected), float(d.get("created_per_min") or 0.0), int(d.get("created_in_window") or 0),
                   float(d.get("window_s") or 0.0), int(d.get("released") or 0),
                   None if med is None else float(med), int(d.get("short_lived") or 0))


# What to do about a client built per call, by kind (the seed's first remedy: build it once).
_ADVICE = {
    "requests.Session": "share one requests.Session (requests.get() and friends build a new one per call)",
    "httpx.Client": "build one httpx.Client for the app and reuse it",
    "httpx.AsyncClient": "build one httpx.AsyncClient for the app and reuse it",
    "aiohttp.ClientSession": "build one aiohttp.ClientSession for the app and reuse it",
    "grpc.Channel": "create the channel once and reuse it (one channel multiplexes many calls)",
    "grpc.aio.Channel": "create the channel once and reuse it (one channel multiplexes many calls)",
    "urllib3.PoolManager": "keep one PoolManager and reuse it",
    "urllib3.ProxyManager": "keep one ProxyManager and reuse it",
    "urllib3.HTTPConnectionPool": "keep one pool (or a PoolManager) and reuse it",
    "urllib3.HTTPSConnectionPool": "keep one pool (or a PoolManager) and reuse it",
}


def churn_advice(kind: str, role: Optional[str] = None) -> str:
    """One line of advice for a call site that builds a client per call."""
    if kind == "socket":
        return "a new connection per call: reuse one client or pool (keep-alive), or check that the server keeps them"
    return _ADVICE.get(kind, "build the client once (a shared instance, or injected) and reuse it")


def median_lifetime(lives: Sequence[int]) -> Optional[float]:
    """The median of lifetime bucket counts (seconds), interpolated inside its bucket on a log scale."""
    n = sum(lives)
    if n <= 0:
        return None
    half = n / 2.0
    seen = 0
    for i, c in enumerate(lives):
        if c and seen + c >= half:
            low, high = life_bucket_bounds(i)
            frac = (half - seen) / c
            if low <= 0.0:
                return high * frac if high != float("inf") else low
            if high == float("inf"):
                return low
            return float(low * (high / low) ** frac)
        seen += c
    return None


def assess_churn(role: Optional[str], created_points: Sequence[Point], lives: Sequence[int],
                 created: int, first_seen: float, now: float) -> Churn:
    """Decide whether a call site builds a client per call (see the module docstring).

    ``created_points`` are (time, created) samples of the window, the last one now; with fewer
    than two, the rate is taken over the site's life (``first_seen`` to ``now``).
    """
    if len(created_points) >= 2 and created_points[-1][0] - created_points[0][0] > 0.0:
        span = created_points[-1][0] - created_points[0][0]
        made = max(0, created_points[-1][1] - created_points[0][1])
    else:
        span = max(now - first_seen, 0.0)
        made = created
    per_min = made / max(span, 1.0) * 60.0
    released = sum(lives)
    med = median_lifetime(lives)
    short = sum(lives[:LIFE_AT_10S])
    suspected = (
        role not in CHURN_EXEMPT_ROLES
        and made >= CHURN_MIN_CREATED
        and per_min >= CHURN_MIN_RATE
        and released >= CHURN_MIN_RELEASED
        and med is not None and med < CHURN_MAX_LIFETIME_S
    )
    return Churn(suspected, per_min, made, span, released, med, short)


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
        self._created: Dict[Key, Deque[Point]] = {}
        self._fds: Deque[Point] = deque(maxlen=window)

    def add(self, now: float, lives: Iterable[Tuple[Key, int]], fds_open: Optional[int],
            created: Optional[Mapping[Key, int]] = None) -> None:
        """Record one sample: the live count (and created count) of every call site, and the open fds."""
        with self._lock:
            seen = set()
            for key, live in lives:
                seen.add(key)
                ring = self._sites.get(key)
                if ring is None:
                    ring = self._sites[key] = deque(maxlen=self.window)
                ring.append((now, live))
                if created is not None and key in created:
                    cring = self._created.get(key)
                    if cring is None:
                        cring = self._created[key] = deque(maxlen=self.window)
                    cring.append((now, created[key]))
            for key in [k for k in self._sites if k not in seen]:
                del self._sites[key]  # a site the registry forgot (after clear())
                self._created.pop(key, None)
            if fds_open is not None:
                self._fds.append((now, fds_open))

    def points(self, key: Key, current: Optional[Point] = None) -> List[Point]:
        """The (time, live) samples of one call site's window (plus ``current``, if newer)."""
        with self._lock:
            ring = self._sites.get(key)
            points = list(ring) if ring is not None else []
        if current is not None and (not points or current[0] > points[-1][0]):
            points.append(current)
            points = points[-self.window:]
        return points

    def growth(self, key: Key, current: Optional[Point] = None) -> Optional[Growth]:
        """The growth of one call site over its window (plus ``current``, if newer); None if unseen."""
        points = self.points(key, current)
        return assess(points) if points else None

    def created_points(self, key: Key, current: Point) -> List[Point]:
        """The (time, created) samples of one call site's window, plus ``current`` if newer."""
        with self._lock:
            ring = self._created.get(key)
            points = list(ring) if ring is not None else []
        if not points or current[0] > points[-1][0]:
            points.append(current)
            points = points[-self.window:]
        return points

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
            self._created.clear()
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
