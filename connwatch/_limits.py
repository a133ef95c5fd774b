"""Cap policy: live clients per process, per call site and per upstream; warn or raise.

What counts: outbound client objects (grpc channels, HTTP pools and sessions) and client
sockets (those that connect). Listeners, accepted sockets and socket pairs never count.
Where a refusal happens: client objects at construction, sockets at ``connect`` (the first
moment a socket's role is known), uvloop's connections when ``create_connection`` starts (for a
host name, its per-upstream cap once libuv has resolved and connected it: that connection is
aborted); in raise mode the check runs *before* the original, so a refused client spends no
descriptor and opens no connection. Checks reserve their slot
atomically in the registry, so racing threads never let more than the limit through.
"""

from __future__ import annotations

import errno

from . import _log, _registry
from ._callsite import CallSite
from ._upstream import upstream_of

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

WARN_PERIOD_S = 60.0
_VARS = {"process": "CONNWATCH_CAP", "callsite": "CONNWATCH_CAP_PER_CALLSITE",
         "upstream": "CONNWATCH_CAP_PER_UPSTREAM"}
_WHAT = {"process": "live clients in this process", "callsite": "live clients from this call site",
         "upstream": "live clients to {upstream}"}


class ClientCapExceeded(OSError):
    """A new client was refused because a connwatch cap was reached (raise mode).

    An ``OSError`` with ``errno.EMFILE``, so code that handles connection errors handles it.
    Attributes: ``site`` (CallSite), ``kind``, ``limit_name`` (process/callsite/upstream),
    ``limit``, ``current``, ``upstream``.
    """

    def __init__(self, message: str, site: Optional[CallSite] = None, kind: str = "",
                 limit_name: str = "", limit: int = 0, current: int = 0,
                 upstream: Optional[str] = None) -> None:
        super().__init__(errno.EMFILE, message)
        self.site = site
        self.kind = kind
        self.limit_name = limit_name
        self.limit = limit
        self.current = current
        self.upstream = upstream

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> Any:
        return (_rebuild, (self.strerror, self.kind, self.limit_name, self.limit, self.current, self.upstream))


def _rebuild(message: str, kind: str, limit_name: str, limit: int, current: int,
             upstream: Optional[str]) -> ClientCapExceeded:
    return ClientCapExceeded(message, None, kind, limit_name, limit, current, upstream)


class _Policy:
    __slots__ = ("cap", "mode", "per_callsite", "per_upstream")

    def __init__(self, cap: Optional[int], per_callsite: Optional[int], per_upstream: Optional[int],
                 mode: str) -> None:
        self.cap = cap
        self.per_callsite = per_callsite
        self.per_upstream = per_upstream
        self.mode = mode


_policy: Optional[_Policy] = None
_mode = "warn"
_exceeded = [0]
# (kind, role, site id) -> [count, kind, site]: cap hits for the metric's attributes
_exceeded_by: Dict[Tuple[str, int], List[Any]] = {}


def configure(cap: Optional[int] = None, per_callsite: Optional[int] = None,
              per_upstream: Optional[int] = None, mode: str = "warn") -> None:
    """Set the caps; with none set, checks cost nothing."""
    global _policy, _mode
    _mode = mode if mode in ("warn", "raise") else "warn"
    if cap is None and per_callsite is None and per_upstream is None:
        _policy = None
    else:
        _policy = _Policy(cap, per_callsite, per_upstream, _mode)


def active() -> bool:
    """Whether any cap is set."""
    return _policy is not None


def describe() -> Dict[str, Any]:
    """The snapshot's ``cap`` object."""
    p = _policy
    return {
        "limit": p.cap if p else None,
        "per_callsite": p.per_callsite if p else None,
        "per_upstream": p.per_upstream if p else None,
        "mode": _mode,
        "exceeded": _exceeded[0],
    }


def exceeded_counts() -> List[Tuple[str, CallSite, int]]:
    """(kind, site, count) of every cap hit so far (for the ``connwatch.cap.exceeded`` metric)."""
    return [(v[1], v[2], v[0]) for v in list(_exceeded_by.values())]


def check(kind: str, site: CallSite, upstream: Optional[str]) -> Optional[_registry.Reservation]:
    """Check the caps for one new client; call before the original constructor or connect.

    Returns a reservation to pass to ``registry.track``/``set_role`` (or ``unreserve`` if
    the original fails), or None when no cap applies. Raises ClientCapExceeded in raise mode.
    """
    p = _policy
    if p is None:
        return None
    return _check(p, kind, site, upstream, p.cap, p.per_callsite, p.per_upstream)


def check_upstream(kind: str, site: CallSite, upstream: Optional[str]) -> Optional[_registry.Reservation]:
    """:func:`check` for the per-upstream cap alone: for a client whose upstream is known only
    once it is connected (a host name resolved inside a library's C code, as uvloop's)."""
    p = _policy
    if p is None or p.per_upstream is None or upstream is None:
        return None
    return _check(p, kind, site, upstream, None, None, p.per_upstream)


def _check(p: _Policy, kind: str, site: CallSite, upstream: Optional[str], cap: Optional[int],
           per_callsite: Optional[int], per_upstream: Optional[int]) -> Optional[_registry.Reservation]:
    hold = p.mode == "raise"
    hit = _registry.reserve(site, upstream, cap, per_callsite, per_upstream, hold=hold)
    if hit is None:
        return (site, upstream) if hold else None
    which, limit, current = hit
    _count(kind, site)
    message = _message(kind, site, upstream, which, limit, current, p.mode)
    if hold:
        raise ClientCapExceeded(message, site, kind, which, limit, current, upstream)
    tb = "".join(f"\n    {f}:{ln} in {fn}" for f, ln, fn in reversed(site.traceback))
    _log.warn_every(f"cap:{id(site)}:{which}", WARN_PERIOD_S, "%s\n  call site traceback (most recent call last):%s",
                    message, tb)
    return None


def _count(kind: str, site: CallSite) -> None:
    _exceeded[0] += 1
    key = (kind, id(site))
    entry = _exceeded_by.get(key)
    if entry is None:
        _exceeded_by[key] = [1, kind, site]
    else:
        entry[0] += 1


def _message(kind: str, site: CallSite, upstream: Optional[str], which: str, limit: int, current: int,
             mode: str) -> str:
    what = _WHAT[which].format(upstream=upstream)
    verb = "refused" if mode == "raise" else "allowed (warn mode)"
    head = (f"connwatch: new {kind} at {site.file}:{site.line} ({site.function}) {verb}: "
            f"{what} would exceed {_VARS[which]}={limit} ({current} live)")
    return head + "; top live call sites: " + top_sites()


def top_sites(n: int = 5) -> str:
    """The ``n`` call sites with the most live clients, as one line."""
    per: Dict[int, List[Any]] = {}
    for kind, role, site, live, *_rest in _registry.records():
        if live and _registry.counts_toward_cap(kind, role):
            entry = per.setdefault(id(site), [0, site, set()])
            entry[0] += live
            entry[2].add(kind)
    top = sorted(per.values(), key=lambda e: -e[0])[:n]
    if not top:
        return "(none)"
    return "; ".join(f"{e[0]} {'+'.join(sorted(e[2]))} at {e[1].file}:{e[1].line} ({e[1].function})" for e in top)


def guarded_check(kind: str, site: CallSite, upstream: Optional[str]) -> Optional[_registry.Reservation]:
    """:func:`check` for wrappers: only the deliberate ClientCapExceeded can escape."""
    try:
        return check(kind, site, upstream)
    except ClientCapExceeded:
        raise
    except Exception:
        _log.internal_error("cap check")
        return None


def socket_connect_check(sock: Any, address: Any) -> Optional[_registry.Reservation]:
    """The socket patch's ``before_connect``: a socket becomes a client when it connects."""
    try:
        info = _registry.info(sock)
        if info is None or info[1] == "client":
            return None
        upstream = upstream_of(address)
    except Exception:
        _log.internal_error("cap check (socket)")
        return None
    return guarded_check("socket", info[2], upstream)


def reset() -> None:
    """Forget hits (tests)."""
    _exceeded[0] = 0
    _exceeded_by.clear()
