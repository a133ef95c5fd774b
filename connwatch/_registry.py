"""The registry: exact live/created/closed counts per (kind, role, call site).

Hazards, and how this module meets them:

* **No strong references.** Each tracked object gets one ``_Ref`` (a slotted ``weakref.ref``)
  whose callback reports a collection. The registry maps ``id(obj)`` to that ref.
* **Garbage collection inside our own critical section.** The cyclic GC can run at any
  allocation, and it runs weakref callbacks and ``__del__`` methods (which may close sockets)
  on the current thread. So callbacks never take the lock: they append to ``_deferred``; and
  a re-entrant call from inside a critical section (``_busy`` set by the lock holder) also
  defers its operation. Every locked operation drains ``_deferred`` first, so reads are exact.
* **id reuse.** A collected object's id can be reused by a new one before its callback is
  drained: removals check identity (``d.get(oid) is ref``) before deleting.
* **Fork.** ``before`` takes the lock, both sides release or replace it; the child keeps the
  objects it inherited (it holds them) and restarts its created/closed history from there.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from ._callsite import CallSite

_monotonic = time.monotonic


class _Ref(weakref.ref):  # type: ignore[type-arg]
    __slots__ = ("born", "oid", "stat", "upstream")
    stat: Optional[_Stat]
    born: float
    oid: int
    upstream: Optional[str]


class _Stat:
    """Counts for one (kind, role, call site)."""

    __slots__ = ("created", "gc_released", "kind", "refs", "role", "site", "upstreams")

    def __init__(self, kind: str, role: Optional[str], site: CallSite) -> None:
        self.kind = kind
        self.role = role
        self.site = site
        # oid -> ref, in insertion order: the first value is the oldest live object.
        self.refs: Dict[int, _Ref] = {}
        self.created = 0
        self.gc_released = 0
        # upstream -> [live, created]
        self.upstreams: Dict[str, List[int]] = {}


# Raw record handed to the snapshot: (kind, role, site, live, created, gc_released,
# oldest_born or None, ((upstream, live, created), ...))
Record = Tuple[str, Optional[str], CallSite, int, int, int, Optional[float], Tuple[Tuple[str, int, int], ...]]

_lock = threading.RLock()
_busy = False
_deferred: Deque[Tuple[Any, ...]] = deque()
_live: Dict[int, _Ref] = {}
_stats: Dict[Tuple[str, Optional[str], int], _Stat] = {}
_upstream_live: Dict[str, int] = {}
# What caps count (client objects and client sockets): process total and per site id.
_cap_total = [0]
_cap_site: Dict[int, int] = {}
# Cap reservations made before an original constructor/connect runs, consumed by track.
_res_total = [0]
_res_site: Dict[int, int] = {}
_res_up: Dict[str, int] = {}
Reservation = Tuple[CallSite, Optional[str]]

# Optional observer of creations (span events): called after a track with
# (obj, kind, site, upstream), outside the lock; its errors are swallowed.
on_track: Optional[Any] = None

_TRACK, _RELEASE, _GC, _ROLE, _TRANSFER, _NOOP, _UNRESERVE = range(7)


def _on_collected(ref: _Ref, _append: Any = _deferred.append, _gc: int = _GC) -> None:
    # Runs inside the GC, possibly while this thread holds the lock: only append.
    _append((_gc, ref))


# --- the operations (called with the lock held and _busy set) --------------------------------

def counts_toward_cap(kind: str, role: Optional[str]) -> bool:
    """Client objects and client sockets count toward caps; listeners, accepted and pairs don't."""
    return kind != "socket" or role == "client"


def _consume(res: Optional[Reservation]) -> None:
    if res is None:
        return
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


def _add(ref: _Ref, kind: str, role: Optional[str], site: CallSite, upstream: Optional[str],
         count_created: bool = True, res: Optional[Reservation] = None) -> None:
    _consume(res)
    if counts_toward_cap(kind, role):
        _cap_total[0] += 1
        _cap_site[id(site)] = _cap_site.get(id(site), 0) + 1
    key = (kind, role, id(site))  # sites are interned; hashing the dataclass would cost more
    stat = _stats.get(key)
    if stat is None:
        stat = _stats[key] = _Stat(kind, role, site)
    ref.stat = stat
    ref.upstream = upstream
    stat.refs[ref.oid] = ref
    if count_created:
        stat.created += 1
    if upstream is not None:
        u = stat.upstreams.get(upstream)
        if u is None:
            stat.upstreams[upstream] = [1, 1]
        else:
            u[0] += 1
            u[1] += 1
        _upstream_live[upstream] = _upstream_live.get(upstream, 0) + 1
    _live[ref.oid] = ref


def _remove(ref: _Ref, collected: bool, uncount: bool = False) -> None:
    """Drop ``ref``; ``uncount`` undoes its creation instead of counting a close."""
    stat = ref.stat
    if stat is None:
        return
    ref.stat = None
    if stat.refs.get(ref.oid) is ref:
        del stat.refs[ref.oid]
    if _live.get(ref.oid) is ref:
        del _live[ref.oid]
    if uncount:
        stat.created -= 1
    elif collected:
        stat.gc_released += 1
    if counts_toward_cap(stat.kind, stat.role):
        _cap_total[0] -= 1
        sid = id(stat.site)
        n = _cap_site.get(sid, 0) - 1
        if n > 0:
            _cap_site[sid] = n
        else:
            _cap_site.pop(sid, None)
    up = ref.upstream
    if up is not None:
        u = stat.upstreams.get(up)
        if u is not None:
            u[0] -= 1
            if uncount:
                u[1] -= 1
        n = _upstream_live.get(up, 0) - 1
        if n > 0:
            _upstream_live[up] = n
        else:
            _upstream_live.pop(up, None)


def _set_role(ref: _Ref, role: Optional[str], upstream: Optional[str],
              res: Optional[Reservation] = None) -> None:
    _consume(res)
    stat = ref.stat
    if stat is None or (stat.role == role and ref.upstream == upstream):
        return
    born = ref.born
    _remove(ref, False, uncount=True)
    ref.born = born
    _add(ref, stat.kind, role, stat.site, upstream)


def _transfer(old: _Ref, new: _Ref) -> None:
    stat = old.stat
    if stat is None:
        return
    cur = _live.get(new.oid)
    if cur is not None and cur is not new:
        _remove(cur, False, uncount=True)  # the new object was counted on its own: undo that
    upstream = old.upstream
    _remove(old, False, uncount=True)
    new.born = old.born
    _add(new, stat.kind, stat.role, stat.site, upstream)


def _drain() -> None:
    pop = _deferred.popleft
    while _deferred:
        op = pop()
        tag = op[0]
        if tag == _GC:
            _remove(op[1], True)
        elif tag == _RELEASE:
            _remove(op[1], False)
        elif tag == _TRACK:
            _add(*op[1:])
        elif tag == _ROLE:
            _set_role(op[1], op[2], op[3], op[4])
        elif tag == _UNRESERVE:
            _consume(op[1])
        elif tag == _TRANSFER:
            _transfer(op[1], op[2])


def _run(op: Tuple[Any, ...]) -> None:
    """Apply one operation under the lock, or defer it if this thread is already inside."""
    global _busy
    with _lock:
        if _busy:
            # Re-entered from a GC callback or __del__ inside our own critical section.
            _deferred.append(op)
            return
        _busy = True
        try:
            _deferred.append(op)
            _drain()
        finally:
            _busy = False


# --- public operations -----------------------------------------------------------------------

def track(obj: object, kind: str, site: CallSite, role: Optional[str] = None,
          upstream: Optional[str] = None, reservation: Optional[Reservation] = None) -> None:
    """Count ``obj`` as one live client of ``kind`` created at ``site``.

    ``reservation`` is the cap reservation (from :func:`reserve`) this object fills.
    """
    ref = _Ref(obj, _on_collected)
    ref.stat = None
    ref.oid = id(obj)
    ref.born = _monotonic()
    ref.upstream = None
    _run((_TRACK, ref, kind, role, site, upstream, True, reservation))
    hook = on_track
    if hook is not None:
        try:
            hook(obj, kind, site, upstream)
        except Exception:
            from . import _log

            _log.internal_error("on_track hook")


def release(obj: object) -> bool:
    """Count ``obj`` as closed; returns False when it was not tracked (or already released)."""
    ref = _live.get(id(obj))
    if ref is None or ref() is not obj:
        return False
    _run((_RELEASE, ref))
    return True


def set_role(obj: object, role: Optional[str], upstream: Optional[str] = None,
             reservation: Optional[Reservation] = None) -> None:
    """Move a tracked object to another role (a socket that connected or listened)."""
    ref = _live.get(id(obj))
    if ref is not None and ref() is obj:
        _run((_ROLE, ref, role, upstream, reservation))
    elif reservation is not None:
        _run((_UNRESERVE, reservation))


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
            total = _cap_total[0] + _res_total[0]
            if cap is not None and total + 1 > cap:
                return ("process", cap, total)
            sid = id(site)
            if per_site is not None:
                n = _cap_site.get(sid, 0) + _res_site.get(sid, 0)
                if n + 1 > per_site:
                    return ("callsite", per_site, n)
            if per_upstream is not None and upstream is not None:
                n = _upstream_live.get(upstream, 0) + _res_up.get(upstream, 0)
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
    _run((_UNRESERVE, reservation))


def transfer(old: object, new: object) -> bool:
    """Hand ``old``'s record (site, role, upstream, age) to ``new`` without counting a close.

    For ownership hand-overs such as an SSLSocket built on a socket's descriptor.
    """
    ref = _live.get(id(old))
    if ref is None or ref() is not old:
        return False
    new_ref = _Ref(new, _on_collected)
    new_ref.stat = None
    new_ref.oid = id(new)
    new_ref.upstream = None
    new_ref.born = ref.born
    _run((_TRANSFER, ref, new_ref))
    return True


def info(obj: object) -> Optional[Tuple[str, Optional[str], CallSite, Optional[str]]]:
    """(kind, role, site, upstream) of a tracked live object, else None."""
    ref = _live.get(id(obj))
    if ref is None or ref() is not obj:
        return None
    stat = ref.stat
    if stat is None:
        return None
    return stat.kind, stat.role, stat.site, ref.upstream


def is_tracked(obj: object) -> bool:
    """Whether ``obj`` is currently counted as live."""
    ref = _live.get(id(obj))
    return ref is not None and ref() is obj and ref.stat is not None


def flush() -> None:
    """Apply deferred operations (collections reported by the GC)."""
    if _deferred:
        _run((_NOOP,))


def live_total() -> int:
    """Live tracked objects in the process (exact after pending collections are applied)."""
    flush()
    return len(_live)


def cap_live() -> int:
    """Live objects that count toward caps (client objects and client sockets)."""
    flush()
    return _cap_total[0]


def upstream_live(upstream: str) -> int:
    """Live tracked clients to ``upstream`` (``host:port``)."""
    flush()
    return _upstream_live.get(upstream, 0)


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
                refs = stat.refs
                if not refs and not stat.created:
                    continue  # only ever a waypoint of role moves
                oldest = None
                if refs:
                    oldest = next(iter(refs.values())).born
                ups = tuple((u, v[0], v[1]) for u, v in stat.upstreams.items() if v[0] or v[1])
                out.append((stat.kind, stat.role, stat.site, len(refs), stat.created,
                            stat.gc_released, oldest, ups))
            return out
        finally:
            _busy = False


def clear() -> None:
    """Forget everything (tests, and ``connwatch.disable()`` followed by ``enable()``)."""
    global _busy
    with _lock:
        _deferred.clear()
        _live.clear()
        _stats.clear()
        _upstream_live.clear()
        _cap_total[0] = 0
        _cap_site.clear()
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
    for stat in _stats.values():
        stat.created = len(stat.refs)
        stat.gc_released = 0
        for v in stat.upstreams.values():
            v[1] = v[0]
