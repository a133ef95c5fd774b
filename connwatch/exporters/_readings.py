"""Metric readings from the registry, shared by the OTLP, console and Prometheus exporters.

One reading walks ``_registry.records()`` once: its cost grows with call sites, never with
live clients. Cardinality is bounded here, deterministically: the first ``max_callsites``
distinct call sites seen keep their own series for the life of the process; later ones are
summed into one overflow series per kind (``code.file.path="_other"``). Snapshot files and
reports are not affected: they read the registry, not these readings.

Counters stay monotonic: ``connwatch.clients.created`` is keyed by (kind, call site) only,
because a socket moves between upstreams and roles (created uncounted on one, counted on the
other) while its per-site sum only grows. ``server.address``/``server.port`` go on the live
gauge, for the first ``MAX_UPSTREAMS_PER_SITE`` upstreams of a site (the rest stay in the
site's series without them), and at most ``max_callsites`` such upstream series overall.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import _callsite, _fds, _leaks, _limits, _registry

KIND = "connwatch.client.kind"
FILE = "code.file.path"
LINE = "code.line.number"
FUNCTION = "code.function.name"
ADDRESS = "server.address"
PORT = "server.port"
OVERFLOW = _callsite.OVERFLOW_FILE
MAX_UPSTREAMS_PER_SITE = 8

Attrs = Tuple[Tuple[str, Any], ...]
SiteKey = Tuple[str, int, str]


def split_upstream(upstream: str) -> Tuple[str, Optional[int]]:
    """``host:port`` or ``[v6]:port`` -> (host, port); a port that is not a number gives None."""
    host, sep, port = upstream.rpartition(":")
    if not sep:
        return upstream, None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return host, int(port)
    except ValueError:
        return upstream, None


class Reading:
    """One collection: (attributes, value) series per metric, plus the fd numbers."""

    __slots__ = ("cap_exceeded", "created", "fd_limit", "fd_open", "fd_utilization", "live", "short_lived", "time")

    def __init__(self) -> None:
        self.time = time.monotonic()
        self.live: Dict[Attrs, int] = {}
        self.created: Dict[Attrs, int] = {}
        # Clients released within 10 s of their creation (the churn signal: a client per call).
        self.short_lived: Dict[Attrs, int] = {}
        self.cap_exceeded: Dict[Attrs, int] = {}
        self.fd_open: Optional[int] = None
        self.fd_limit: Optional[int] = None
        self.fd_utilization: Optional[float] = None


class Collector:
    """Turns registry records into bounded metric series; thread-safe, cheap to call often."""

    def __init__(self, max_callsites: int = 1000, max_age_s: float = 0.5) -> None:
        self.max_callsites = max(1, int(max_callsites))
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        # Sites with their own series, first seen first: once admitted, always admitted.
        self._admitted: Dict[SiteKey, None] = {}
        self._split: Dict[Tuple[SiteKey, str], None] = {}
        self._base: Dict[Tuple[str, SiteKey], Attrs] = {}
        self._last: Optional[Reading] = None
        self.collect_seconds = 0.0  # duration of the last reading (for the report and tests)

    def reading(self) -> Reading:
        """A fresh reading, or the last one when it is younger than ``max_age_s``.

        The OTLP callbacks of one collection (live, created, cap) share one registry walk.
        """
        with self._lock:
            last = self._last
            if last is not None and time.monotonic() - last.time < self.max_age_s:
                return last
            t0 = time.perf_counter()
            r = self._read()
            self.collect_seconds = time.perf_counter() - t0
            self._last = r
            return r

    def _attrs(self, kind: str, key: SiteKey) -> Attrs:
        cache_key = (kind, key)
        attrs = self._base.get(cache_key)
        if attrs is None:
            attrs = ((KIND, kind), (FILE, key[0]), (LINE, key[1]), (FUNCTION, key[2]))
            self._base[cache_key] = attrs
        return attrs

    def _site(self, site: _callsite.CallSite) -> Tuple[SiteKey, bool]:
        key = (site.file, site.line, site.function)
        if key[0] == OVERFLOW:
            return (OVERFLOW, 0, OVERFLOW), False
        admitted = self._admitted
        if key in admitted:
            return key, True
        if len(admitted) < self.max_callsites:
            admitted[key] = None
            return key, True
        return (OVERFLOW, 0, OVERFLOW), False

    def _read(self) -> Reading:
        r = Reading()
        live = r.live
        created = r.created
        short_lived = r.short_lived
        split = self._split
        short = _registry.LIFE_AT_10S
        exempt = _leaks.CHURN_EXEMPT_ROLES  # a server's accepted sockets are no churn
        for kind, role, site, n_live, n_created, _gc, _oldest, ups, lives, _first in _registry.records():
            key, own = self._site(site)
            base = self._attrs(kind, key)
            created[base] = created.get(base, 0) + n_created
            if role not in exempt:
                short_lived[base] = short_lived.get(base, 0) + sum(lives[:short])
            rest = n_live
            if own and ups:
                for upstream, u_live, _u_created in ups[:MAX_UPSTREAMS_PER_SITE]:
                    sk = (key, upstream)
                    if sk not in split:
                        if len(split) >= self.max_callsites:
                            continue
                        split[sk] = None
                    host, port = split_upstream(upstream)
                    attrs = (*base, (ADDRESS, host)) if port is None else (*base, (ADDRESS, host), (PORT, port))
                    live[attrs] = live.get(attrs, 0) + u_live
                    rest -= u_live
                if rest == 0:
                    live.setdefault(base, 0)  # keeps the site's series (0) next to its upstreams
                    continue
            live[base] = live.get(base, 0) + rest
        for kind, site, count in _limits.exceeded_counts():
            key, _own = self._site(site)
            attrs = self._attrs(kind, key)
            r.cap_exceeded[attrs] = r.cap_exceeded.get(attrs, 0) + count
        r.fd_open = _fds.open_fds()
        r.fd_limit = _fds.fd_limit()
        if r.fd_open is not None and r.fd_limit:
            r.fd_utilization = r.fd_open / r.fd_limit
        return r

    def reset(self) -> None:
        """Forget admitted sites (a forked child starts its own budget)."""
        with self._lock:
            self._admitted.clear()
            self._split.clear()
            self._base.clear()
            self._last = None


def as_dict(attrs: Attrs) -> Dict[str, Any]:
    """Attributes as the dict OpenTelemetry observations take."""
    return dict(attrs)


def series(values: Dict[Attrs, int]) -> List[Tuple[Attrs, int]]:
    """Series in a stable order (for text output)."""
    return sorted(values.items(), key=lambda kv: tuple(str(v) for _k, v in kv[0]))
