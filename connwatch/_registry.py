"""The registry: exact live/created/closed counts per (kind, role, call site).

Hazards, and how this module meets them:

* **No strong references.** Each tracked object gets one ``_Ref`` (a slotted ``weakref.ref``)
  whose callback reports a collection. Nothing maps ids to objects: an object's ``_Ref`` is
  found with ``weakref.getweakrefs(obj)``, so there is no id-reuse hazard and no dict entry
  per object.
* **O(1) and small.** The live refs of one (kind, role, site) form a doubly linked list
  threaded through the refs themselves (``prev``/``next`` slots): insertion at the tail,
  removal anywhere, the oldest live object at the head. About 150 bytes per live object.
* **A lock-free hot path.** ``track``, ``release`` and ``set_role`` only append an event to
  ``_events`` (``deque.append`` is atomic under the GIL). Events are applied in order, in
  batches, under the lock: by every read (``records``, ``reserve``, ``flush``), and by the
  hot path itself once a batch has accumulated. Reads are therefore exact: they apply every
  event appended before them.
* **Garbage collection inside our own critical section.** The cyclic GC can run at any
  allocation, and it runs weakref callbacks and ``__del__`` methods (which may close sockets)
  on the current thread. Callbacks and hot-path calls only append; a drain re-entered on the
  same thread (``_busy`` set by the lock holder) returns at once.
* **Fork.** ``before`` takes the lock, both sides release or replace it; the child keeps the
  objects it inherited (it holds them) and restarts its created/closed history from there.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections import deque

from ._callsite import CallSite

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Deque, Dict, List, Optional, Tuple

_monotonic = time.monotonic
_bisect = bisect.bisect_right
_getweakrefs = weakref.getweakrefs


# Lifetimes of released clients, per stat: LIFE_BUCKETS buckets a factor 2 apart, bucket
# LIFE_AT_10S starting at 10 s (bucket 0: under 0.6 ms; the last: 85 minutes and more). The same
# in _speedups.c (NLIFE, LIFE_AT_10S, life_bucket).
LIFE_BUCKETS = 24
LIFE_AT_10S = 15


def life_bucket_bounds(i: int) -> Tuple[float, float]:
    """(low, high) seconds of lifetime bucket ``i`` (0 and inf at the ends)."""
    low = 0.0 if i <= 0 else 10.0 * 2.0 ** (i - LIFE_AT_10S)
    high = float("inf") if i >= LIFE_BUCKETS - 1 else 10.0 * 2.0 ** (i + 1 - LIFE_AT_10S)
    return low, high


# The lower bounds of buckets 1 .. LIFE_BUCKETS - 1: bisect() over them is a lifetime's bucket,
# the cheapest exact form in Python (a helper with frexp cost ~0.2 us per release).
_LIFE_BOUNDS = tuple(life_bucket_bounds(i)[0] for i in range(1, LIFE_BUCKETS))


def life_bucket(life: float) -> int:
    """The bucket of a lifetime in seconds (as _remove computes it inline)."""
    return _bisect(_LIFE_BOUNDS, life)


class _Ref(weakref.ref):  # type: ignore[type-arg]
    __slots__ = ("born", "life", "next", "prev", "stat", "upstream", "want_role", "want_up")
    # -1.0 while open; at the close or collection, before its event is queued, the seconds from
    # born to then (>= 0: "closed", no second release event); 0.0 once handed over by a transfer.
    # One slot for the closed flag and the lifetime: the hot path stores one value, not two.
    life: float
    # The role and upstream the app asked for, set without the lock: the applied ones are
    # the stat's role and ``upstream``. A role change made before the object's track event
    # is applied needs no event of its own (see _add and set_role).
    want_role: Optional[str]
    want_up: Optional[str]
    stat: Optional[_Stat]
    born: float
    upstream: Optional[str]
    prev: Optional[_Ref]
    next: Optional[_Ref]


class _Stat:
    """Counts for one (kind, role, call site), and its live refs as a linked list."""

    __slots__ = ("cap", "created", "first", "gc_released", "head", "kind", "live", "lives", "role", "site", "tail",
                 "upstreams")

    def __init__(self, kind: str, role: Optional[str], site: CallSite) -> None:
        self.first = _monotonic()  # when the stat was made
        self.lives = [0] * LIFE_BUCKETS  # released clients per lifetime bucket
        self.kind = kind
        self.role = role
        self.site = site
        self.cap = kind != "socket" or role == "client"  # counts toward caps
        self.head: Optional[_Ref] = None  # oldest live
        self.tail: Optional[_Ref] = None  # newest live
        self.live = 0
        self.created = 0
        self.gc_released = 0
        # upstream -> [live, created]
        self.upstreams: Dict[str, List[int]] = {}


if TYPE_CHECKING:
    # Raw record handed to the snapshot: (kind, role, site, live, created, gc_released,
    # oldest_born or None, ((upstream, live, created), ...), lifetime bucket counts, first seen)
    Record = Tuple[str, Optional[str], CallSite, int, int, int, Optional[float], Tuple[Tuple[str, int, int], ...],
                   Tuple[int, ...], float]
    Reservation = Tuple[CallSite, Optional[str]]

_lock = threading.RLock()
_busy = False
_events: Deque[Tuple[Any, ...]] = deque()
_append = _events.append
_BATCH = 256  # the hot path applies events itself once this many are queued
_stats: Dict[Tuple[str, Optional[str], int], _Stat] = {}
_totals = [0, 0]  # [live objects, live objects that count toward caps]
# Indexes for the cap checks, grown only when a (kind, role, site) or one of its upstreams is
# first seen, so the per-object path never touches them: a site's stats, and every stat's
# [live, created] counter of an upstream.
_site_stats: Dict[int, List[_Stat]] = {}  # id(site) -> its stats
_up_counts: Dict[str, List[List[int]]] = {}  # upstream -> the stats' [live, created] for it
# Cap reservations made before an original constructor/connect runs, consumed by track.
_res_total = [0]
_res_site: Dict[int, int] = {}
_res_up: Dict[str, int] = {}

_clear_caches: Optional[Any] = None  # the C path's cache reset (see _accelerate)

# Optional observer of creations (span events): called after a track with
# (obj, kind, site, upstream), outside the lock; its errors are swallowed.
on_track: Optional[Any] = None

_TRACK, _RELEASE, _GC, _ROLE, _TRANSFER, _UNRESERVE = range(6)
_APPLYING: Any = object()  # ref.stat while its track event is being applied


def _on_collected(ref: _Ref, _append: Any = _append, _gc: int = _GC) -> None:
    # Runs inside the GC, possibly while this thread holds the lock: only append. A ref whose
    # release is already queued (closed, then dropped) needs no second event.
    if ref.life < 0.0:
        ref.life = _monotonic() - ref.born
        _append((_gc, ref))


def counts_toward_cap(kind: str, role: Optional[str]) -> bool:
    """Client objects and client sockets count toward caps; listeners, accepted and pairs don't."""
    return kind != "socket" or role == "client"


def _ref_of(obj: object) -> Optional[_Ref]:
    """The live (not released) ref of ``obj``, whether or not its track event is applied yet."""
    for r in _getweakrefs(obj):
        if type(r) is _Ref and r.life < 0.0:
            return r
    return None


# --- the operations (called with the lock held and _busy set) --------------------------------

def _consume(res: Reservation) -> None:
    site, upstream = res
    _res_total[0] -= 1
    sid = id(site)
    n = _res_site.get(sid, 0) - 1
    if n > 0:
        _res_site[sid] = n
    else:
        _res_site.pop(sid, None)
    if upstream is not None:
        n = _res_up.get(upstream, 0) - 1
        if n > 0:
            _res_up[upstream] = n
        else:
            _res_up.pop(upstream, None)


def _add(ref: _Ref, kind: str, site: CallSite, res: Optional[Reservation]) -> None:
    if res is not None:
        _consume(res)
    if ref.stat is not None:
        return
    # Mark the ref before reading the wanted role: a set_role() racing with us either wrote
    # before our read, or sees the mark and queues a role event (applied after this).
    ref.stat = _APPLYING
    role = ref.want_role
    upstream = ref.want_up
    key = (kind, role, id(site))  # sites are interned; hashing the dataclass would cost more
    stat = _stats.get(key)
    if stat is None:
        stat = _stats[key] = _Stat(kind, role, site)
        _site_stats.setdefault(id(site), []).append(stat)
    ref.stat = stat
    ref.upstream = upstream
    tail = stat.tail
    ref.prev = tail
    ref.next = None
    if tail is None:
        stat.head = ref
    else:
        tail.next = ref
    stat.tail = ref
    stat.live += 1
    stat.created += 1
    _totals[0] += 1
    if stat.cap:
        _totals[1] += 1
    if upstream is not None:
        u = stat.upstreams.get(upstream)
        if u is None:
            u = stat.upstreams[upstream] = [1, 1]
            _up_counts.setdefault(upstream, []).append(u)
        else:
            u[0] += 1
            u[1] += 1


def _remove(ref: _Ref, collected: bool, uncount: bool = False) -> None:
    """Drop ``ref``; ``uncount`` undoes its creation instead of counting a close."""
    stat = ref.stat
    if stat is None:
        return
    ref.stat = None
    prev, nxt = ref.prev, ref.next
    if prev is None:
        stat.head = nxt
    else:
        prev.next = nxt
    if nxt is None:
        stat.tail = prev
    else:
        nxt.prev = prev
    ref.prev = ref.next = None
    stat.live -= 1
    _totals[0] -= 1
    if uncount:
        stat.created -= 1
    else:
        stat.lives[_bisect(_LIFE_BOUNDS, ref.life)] += 1  # life_bucket(), inline
        if collected:
            stat.gc_released += 1
    if stat.cap:
        _totals[1] -= 1
    up = ref.upstream
    if up is not None:
        u = stat.upstreams.get(up)
        if u is not None:
            u[0] -= 1
            if uncount:
                u[1] -= 1


def _set_role(ref: _Ref, res: Optional[Reservation]) -> None:
    stat = ref.stat
    if stat is None or (stat.role == ref.want_role and ref.upstream == ref.want_up):
        if res is not None:
            _consume(res)
        return
    _remove(ref, False, uncount=True)
    _add(ref, stat.kind, stat.site, res)


def _transfer(old: _Ref, new: _Ref) -> None:
    stat = old.stat
    if stat is None:
        return
    cur = _ref_of_live(new)
    if cur is not None:
        _remove(cur, False, uncount=True)  # the new object was counted on its own: undo that
    new.born = old.born
    new.want_role = stat.role
    new.want_up = old.upstream
    _remove(old, False, uncount=True)
    _add(new, stat.kind, stat.site, None)


def _ref_of_live(ref: _Ref) -> Optional[_Ref]:
    """Another ref of the same object that is counted (applied)."""
    obj = ref()
    if obj is None:
        return None
    for r in _getweakrefs(obj):
        if type(r) is _Ref and r is not ref and r.stat is not None:
            return r
    return None


def _apply(op: Tuple[Any, ...]) -> None:
    tag = op[0]
    if tag == _TRACK:
        _add(op[1], op[2], op[3], op[4])
    elif tag == _RELEASE:
        _remove(op[1], False)
    elif tag == _GC:
        _remove(op[1], True)
    elif tag == _ROLE:
        _set_role(op[1], op[2])
    elif tag == _TRANSFER:
        _transfer(op[1], op[2])
    elif tag == _UNRESERVE:
        _consume(op[1])


def _drain() -> None:
    """Apply the queued events (lock held, ``_busy`` set), including those queued meanwhile
    by other threads or by the GC: a read sees every event queued before it."""
    pop = _events.popleft
    while _events:
        op = pop()
        try:
            if op[0] == _TRACK:  # the common events inline: this loop is the registry's cost
                _add(op[1], op[2], op[3], op[4])
            elif op[0] == _RELEASE:
                _remove(op[1], False)
            else:
                _apply(op)
        except Exception:
            from . import _log

            _log.internal_error("the registry")


def flush() -> None:
    """Apply queued events now (every read does this first)."""
    global _busy
    if not _events:
        return
    with _lock:
        if _busy:
            return  # re-entered on this thread (GC inside a drain): the outer drain goes on
        _busy = True
        try:
            _drain()
        finally:
            _busy = False


# --- public operations -----------------------------------------------------------------------

def track(obj: object, kind: str, site: CallSite, role: Optional[str] = None,
          upstream: Optional[str] = None, reservation: Optional[Reservation] = None) -> None:
    """Count ``obj`` as one live client of ``kind`` created at ``site``.

    ``reservation`` is the cap reservation (from :func:`reserve`) this object fills.
    Callers track an object once (patches suppress nested constructors).
    """
    ref = _Ref(obj, _on_collected)
    ref.stat = None
    ref.life = -1.0  # open
    ref.want_role = role
    ref.want_up = upstream
    ref.born = _monotonic()
    _append((_TRACK, ref, kind, site, reservation))
    if len(_events) > _BATCH:
        flush()
    hook = on_track
    if hook is not None:
        try:
            hook(obj, kind, site, upstream)
        except Exception:
            from . import _log

            _log.internal_error("on_track hook")


def release(obj: object) -> bool:
    """Count ``obj`` as closed; returns False when it was not tracked (or already released)."""
    for ref in _getweakrefs(obj):
        if type(ref) is _Ref and ref.life < 0.0:
            ref.life = _monotonic() - ref.born  # closed, with its lifetime
            _append((_RELEASE, ref))
            if len(_events) > _BATCH:
                flush()
            return True
    return False


def set_role(obj: object, role: Optional[str], upstream: Optional[str] = None,
             reservation: Optional[Reservation] = None) -> None:
    """Move a tracked object to another role (a socket that connected or listened)."""
    ref = _ref_of(obj)
    if ref is not None:
        ref.want_role = role
        ref.want_up = upstream
        # Not yet applied (the usual case: a socket connects right after it is made): the
        # track event will read the wanted role. Otherwise (or with a reservation to hand
        # over) an event moves it.
        if ref.stat is not None or reservation is not None:
            _append((_ROLE, ref, reservation))
    elif reservation is not None:
        _append((_UNRESERVE, reservation))
    if len(_events) > _BATCH:
        flush()


def _site_live(sid: int) -> int:
    """Live objects from one site that count toward caps (O(roles of the site))."""
    return sum(st.live for st in _site_stats.get(sid, ()) if st.cap)


def _upstream_live(upstream: str) -> int:
    """Live tracked objects to one upstream (O(stats that ever had it))."""
    return sum(u[0] for u in _up_counts.get(upstream, ()))


def reserve(site: CallSite, upstream: Optional[str], cap: Optional[int], per_site: Optional[int],
            per_upstream: Optional[int], hold: bool = True) -> Optional[Tuple[str, int, int]]:
    """Check the caps for one more client from ``site`` to ``upstream``, atomically.

    Returns None when it fits (and, with ``hold``, holds a reservation the caller must hand
    to :func:`track`/:func:`set_role` or give back with :func:`unreserve`); otherwise
    ``(which, limit, current)`` for the first limit it would exceed.
    """
    global _busy
    with _lock:
        if _busy:
            return None  # re-entered from the GC inside our own section: never refuse here
        _busy = True
        try:
            _drain()
            total = _totals[1] + _res_total[0]
            if cap is not None and total + 1 > cap:
                return ("process", cap, total)
            sid = id(site)
            if per_site is not None:
                n = _site_live(sid) + _res_site.get(sid, 0)
                if n + 1 > per_site:
                    return ("callsite", per_site, n)
            if per_upstream is not None and upstream is not None:
                n = _upstream_live(upstream) + _res_up.get(upstream, 0)
                if n + 1 > per_upstream:
                    return ("upstream", per_upstream, n)
            if hold:
                _res_total[0] += 1
                _res_site[sid] = _res_site.get(sid, 0) + 1
                if upstream is not None:
                    _res_up[upstream] = _res_up.get(upstream, 0) + 1
            return None
        finally:
            _busy = False


def unreserve(reservation: Reservation) -> None:
    """Give back a reservation whose client was never made (the original raised)."""
    _append((_UNRESERVE, reservation))
    flush()


def transfer(old: object, new: object) -> bool:
    """Hand ``old``'s record (site, role, upstream, age) to ``new`` without counting a close.

    For ownership hand-overs such as an SSLSocket built on a socket's descriptor.
    """
    ref = _ref_of(old)
    if ref is None:
        return False
    own = _ref_of(new)
    if own is not None:
        own.life = 0.0  # closed: replaced by new_ref when the transfer is applied
    new_ref = _Ref(new, _on_collected)
    new_ref.stat = None
    new_ref.life = -1.0
    new_ref.born = ref.born
    ref.life = 0.0  # closed (a transfer counts no lifetime)
    _append((_TRANSFER, ref, new_ref))
    flush()
    return True


def info(obj: object) -> Optional[Tuple[str, Optional[str], CallSite, Optional[str]]]:
    """(kind, role, site, upstream) of a tracked live object, else None."""
    flush()
    ref = _ref_of(obj)
    stat = ref.stat if ref is not None else None
    if ref is None or stat is None:
        return None
    return stat.kind, stat.role, stat.site, ref.upstream


def is_tracked(obj: object) -> bool:
    """Whether ``obj`` is currently counted as live."""
    return _ref_of(obj) is not None


def ever_tracked() -> bool:
    """Whether anything was ever tracked in this process (cheap: no lock, no drain)."""
    return bool(_stats) or bool(_events)


def live_total() -> int:
    """Live tracked objects in the process (exact after pending collections are applied)."""
    flush()
    return _totals[0]


def cap_live() -> int:
    """Live objects that count toward caps (client objects and client sockets)."""
    flush()
    return _totals[1]


def upstream_live(upstream: str) -> int:
    """Live tracked clients to ``upstream`` (``host:port``)."""
    flush()
    with _lock:
        return _upstream_live(upstream)


def records() -> List[Record]:
    """One raw record per (kind, role, site) that has ever been used; cost grows with sites."""
    global _busy
    with _lock:
        if _busy:
            return []
        _busy = True
        try:
            _drain()
            out: List[Record] = []
            for stat in _stats.values():
                if not stat.live and not stat.created:
                    continue  # only ever a waypoint of role moves
                head = stat.head
                ups = tuple((u, v[0], v[1]) for u, v in stat.upstreams.items() if v[0] or v[1])
                out.append((stat.kind, stat.role, stat.site, stat.live, stat.created,
                            stat.gc_released, head.born if head is not None else None, ups,
                            tuple(stat.lives), stat.first))
            return out
        finally:
            _busy = False


def clear() -> None:
    """Forget everything (tests, and ``connwatch.disable()`` followed by ``enable()``)."""
    global _busy
    with _lock:
        _events.clear()
        for stat in _stats.values():
            ref = stat.head
            while ref is not None:  # unlink, so no ref keeps a stat (or another ref) alive
                nxt = ref.next
                ref.stat = ref.prev = ref.next = None
                ref = nxt
        _stats.clear()
        if _clear_caches is not None:
            _clear_caches()  # the C registry's stat cache
        _totals[0] = _totals[1] = 0
        _site_stats.clear()
        _up_counts.clear()
        _res_total[0] = 0
        _res_site.clear()
        _res_up.clear()
        _busy = False


# --- fork ------------------------------------------------------------------------------------

def _before_fork() -> None:
    _lock.acquire()


def _after_fork_parent() -> None:
    _lock.release()


def _after_fork_child() -> None:
    # The inherited lock may be "owned" by the forking thread's ident, which no longer means
    # anything: replace it. The child holds the same objects, so live counts stay; the
    # child's history (created, closed) starts at what it inherited.
    global _lock, _busy
    _lock = threading.RLock()
    _busy = False
    _drain()
    # Reservations belong to threads that do not exist in the child.
    _res_total[0] = 0
    _res_site.clear()
    _res_up.clear()
    now = _monotonic()
    for stat in _stats.values():
        stat.created = stat.live
        stat.gc_released = 0
        stat.lives[:] = [0] * LIFE_BUCKETS
        stat.first = now
        for v in stat.upstreams.values():
            v[1] = v[0]


# --- the C hot path ----------------------------------------------------------------------------

def _c_error(where: str, exc: BaseException) -> None:
    """Log an error the C code caught (it hands over the exception)."""
    from . import _log

    try:
        raise exc
    except Exception:
        _log.internal_error(where)


def _accelerate() -> bool:
    """Swap in ``connwatch._speedups`` (same types, events and containers) when available."""
    global _Ref, _Stat, _on_collected, _drain, track, release, set_role, _ref_of, is_tracked, _clear_caches
    from . import _accel

    sp = _accel.speedups
    if sp is None:
        return False
    sp.bind(_events, _stats, _totals, _site_stats, _up_counts, _res_total, _res_site, _res_up, flush, _c_error,
            globals(), _monotonic, _BATCH)
    _Ref, _Stat, _on_collected = sp.Ref, sp.Stat, sp.on_collected  # type: ignore[misc]
    _drain, track, release, set_role = sp.drain, sp.track, sp.release, sp.set_role
    _ref_of, is_tracked, _clear_caches = sp.ref_of, sp.is_tracked, sp.clear_caches
    return True


ACCELERATED = _accelerate()


# --- on-demand reads of the live objects (retainer search; never on the hot path) -------------

def _is_open(ref: Any) -> bool:
    """Not yet closed: a C Ref has a ``closed`` flag, a Python one a negative ``life``."""
    closed = getattr(ref, "closed", None)
    return not closed if closed is not None else bool(ref.life < 0.0)


def live_objects(max_per_stat: int = 8, newest: bool = False,
                 ) -> List[Tuple[str, Optional[str], CallSite, List[object]]]:
    """Up to ``max_per_stat`` live objects of every (kind, role, site) that has live clients.

    Oldest first (``newest``: newest first, e.g. the clients a guarded block just left).
    Strong references: the caller (the retainer search) must drop the lists when done.
    Cost grows with sites times ``max_per_stat``, never with clients.
    """
    global _busy
    with _lock:
        if _busy:
            return []
        _busy = True
        try:
            _drain()
            out: List[Tuple[str, Optional[str], CallSite, List[object]]] = []
            for stat in list(_stats.values()):
                if not stat.live:
                    continue
                objs: List[object] = []
                ref = stat.tail if newest else stat.head
                while ref is not None and len(objs) < max_per_stat:
                    obj = ref()
                    if obj is not None and _is_open(ref):
                        objs.append(obj)
                    ref = ref.prev if newest else ref.next
                if objs:
                    out.append((stat.kind, stat.role, stat.site, objs))
            return out
        finally:
            _busy = False
