"""Leak and churn checks around a block of code: ``connwatch.guard()``, and the pytest plugin's engine.

A check snapshots the registry before the block and after it, waits a short grace period
for clients that are closed asynchronously (a background thread, an event loop callback),
and reports every call site that holds more live clients than before, beyond what is
allowed or ignored. With ``max_created`` it also reports every call site that created more
than that many clients inside the block, closed or not: a client built per call. Stdlib only:
this is part of the core.
"""

from __future__ import annotations

import fnmatch
import functools
import gc
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, TypeVar, Union

from . import _callsite, _leaks, _snapshot
from ._callsite import SLOTS, CallSite
from ._snapshot import Snapshot, StatisticDiff

DEFAULT_GRACE_S = 0.5
_POLL_S = 0.02
MAX_FRAMES = 8

# allow=: a number of clients in total, patterns allowed without limit, or a budget per pattern.
Allow = Union[int, str, Iterable[str], Mapping[str, int], None]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, **SLOTS)
class Leak:
    """Live clients that one call site (and kind) left behind."""

    kind: str
    role: Optional[str]
    site: Optional[CallSite]
    count: int  # new live clients beyond what was allowed
    live: int  # live clients of the site now
    upstreams: Tuple[Tuple[str, int], ...] = ()
    retainers: Tuple[str, ...] = ()  # paths that hold the newest of these clients
    retainer_note: str = ""  # why there are none (no path found, the search bound)

    def label(self) -> str:
        """The kind with its role."""
        return f"{self.kind}/{self.role}" if self.role else self.kind

    def where(self) -> str:
        """``file:line (function)`` of the call site."""
        return self.site.format() if self.site is not None else "?"


@dataclass(frozen=True, **SLOTS)
class Churned:
    """A call site that created more clients inside a block than ``max_created`` allows."""

    kind: str
    role: Optional[str]
    site: Optional[CallSite]
    created: int  # clients created inside the block
    live: int  # live clients of the site now

    def label(self) -> str:
        """The kind with its role."""
        return f"{self.kind}/{self.role}" if self.role else self.kind

    def where(self) -> str:
        """``file:line (function)`` of the call site."""
        return self.site.format() if self.site is not None else "?"


class LeakError(AssertionError):
    """New live clients remained after a guarded block (an AssertionError, for test runners)."""

    def __init__(self, message: str, leaks: Iterable[Leak] = (), churned: Iterable[Churned] = ()) -> None:
        super().__init__(message)
        self.leaks: Tuple[Leak, ...] = tuple(leaks)
        self.churned: Tuple[Churned, ...] = tuple(churned)


class ChurnError(LeakError):
    """A call site created more clients than ``max_created`` inside a guarded block, closed or not."""


def _names(d: StatisticDiff) -> List[str]:
    """What an allow/ignore pattern can name: the kind, its label, the file, ``file:line``."""
    names = [d.kind, d.label()]
    site = d.site
    if site is not None:
        names += [site.file, f"{site.file}:{site.line}", site.function, site.format()]
    return names


def matches(pattern: str, d: StatisticDiff) -> bool:
    """Whether a glob ``pattern`` names the call site or kind of ``d``.

    A pattern matches a name whole or as a path suffix (``app.py:12`` matches
    ``/srv/app.py:12``), so a test can name a site without its absolute path.
    """
    for name in _names(d):
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*" + os.sep + pattern):
            return True
    return False


def find_leaks(before: Snapshot, after: Snapshot, allow: Allow = 0, ignore: Iterable[str] = ()) -> List[Leak]:
    """Call sites with more live clients in ``after`` than in ``before``, beyond ``allow``/``ignore``.

    ``allow`` is a number (new clients allowed in total), a pattern or list of patterns
    (allowed without limit), or a mapping pattern -> clients allowed for the sites it names.
    """
    ignore = tuple(ignore)
    budget: Dict[str, int] = {}
    unlimited: Tuple[str, ...] = ()
    total = 0
    if isinstance(allow, Mapping):
        budget = {str(k): int(v) for k, v in allow.items()}
    elif isinstance(allow, str):
        unlimited = (allow,)
    elif isinstance(allow, bool) or allow is None:
        total = 0
    elif isinstance(allow, int):
        total = allow
    else:
        unlimited = tuple(str(p) for p in allow)
    now = {(s.kind, s.role, s.site): s for s in after.statistics("callsite")}
    found: List[Leak] = []
    for d in after.compare_to(before):
        n = d.live_diff
        if n <= 0:
            continue
        if any(matches(p, d) for p in ignore + unlimited):
            continue
        for pattern in budget:
            if budget[pattern] > 0 and matches(pattern, d):
                used = min(n, budget[pattern])
                budget[pattern] -= used
                n -= used
        if n <= 0:
            continue
        stat = now.get((d.kind, d.role, d.site))
        found.append(Leak(d.kind, d.role, d.site, n, d.live, stat.upstreams if stat is not None else ()))
    if total > 0 and sum(x.count for x in found) <= total:
        return []
    return found


def find_churn(before: Snapshot, after: Snapshot, max_created: Optional[int],
               ignore: Iterable[str] = ()) -> List[Churned]:
    """Call sites that created more than ``max_created`` clients between the two snapshots.

    Closed or not: a client built per call opens a new connection (and handshake) per call even
    when it never leaks. Accepted sockets, listeners and socket pairs are a server's own traffic
    and never count; ``ignore`` globs name sites or kinds to skip.
    """
    if max_created is None:
        return []
    ignore = tuple(ignore)
    found = []
    for d in after.compare_to(before):
        if d.created_diff <= max_created or d.role in _leaks.CHURN_EXEMPT_ROLES:
            continue
        if any(matches(p, d) for p in ignore):
            continue
        found.append(Churned(d.kind, d.role, d.site, d.created_diff, d.live))
    found.sort(key=lambda c: -c.created)
    return found


def check(before: Snapshot, allow: Allow = 0, ignore: Iterable[str] = (),
          grace: float = DEFAULT_GRACE_S) -> Tuple[List[Leak], Snapshot]:
    """Compare the registry now with ``before``; wait up to ``grace`` seconds for closes.

    Clients that are unreachable but not yet collected (reference cycles) are collected once
    before a leak is reported: what remains is really held by someone.
    """
    deadline = time.monotonic() + max(0.0, grace)
    while True:
        after = _snapshot.take()
        leaks = find_leaks(before, after, allow, ignore)
        if not leaks:
            return leaks, after
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    gc.collect()
    after = _snapshot.take()
    leaks = find_leaks(before, after, allow, ignore)
    return with_retainers(leaks), after


def with_retainers(leaks: List[Leak]) -> List[Leak]:
    """``leaks`` with the paths that keep their newest clients alive (a bounded search)."""
    if not leaks:
        return leaks
    from . import _retainers

    keys = {_retainers.key_of(x.kind, x.role, x.site) for x in leaks if x.site is not None}
    per_site = max(1, min(_retainers.MAX_TARGETS, max(x.count for x in leaks)))
    found, info = _retainers.for_live(keys, newest=True, max_per_site=per_site)
    out = []
    for x in leaks:
        paths = tuple(found.get(_retainers.key_of(x.kind, x.role, x.site), ())) if x.site is not None else ()
        note = ""
        if not paths:
            note = ("no path found within the search bound "
                    f"({info['visited']} objects, {info['elapsed_ms']:.0f} ms)" if info.get("truncated") else
                    "no path found from module globals, class attributes or thread frames "
                    "(held only by C code, or by what the search skips: connwatch itself, weakref.finalize)")
        out.append(replace(x, retainers=paths, retainer_note=note))
    return out


def _frames(site: CallSite) -> List[Tuple[str, int, str]]:
    """The site's traceback, outermost first, trimmed to the app's own frames where possible."""
    frames = list(reversed(site.traceback))
    own = [f for f in frames if _callsite.classify(f[0]) == _callsite.USER]
    return (own or frames)[-MAX_FRAMES:]


def format_churn(churned: Iterable[Churned], max_created: int, what: str = "the block") -> str:
    """A message naming each call site that created too many clients, with its count and advice."""
    churned = list(churned)
    out = [f"connwatch: {what} created more than max_created={max_created} clients at "
           f"{len(churned)} call site{'s' if len(churned) != 1 else ''} (closed or not: a client built per call):"]
    for c in churned:
        out.append(f"  {c.created} {c.label()} created at {c.where()} ({c.live} live there now): "
                   f"{_leaks.churn_advice(c.kind, c.role)}")
        if c.site is not None and c.site.traceback:
            out.append("    traceback (most recent call last):")
            out += [f"      {f}:{ln} in {fn}" for f, ln, fn in _frames(c.site)]
    return "\n".join(out)


def format_leaks(leaks: Iterable[Leak], what: str = "the block") -> str:
    """A message naming each leaking call site with its traceback and counts."""
    leaks = list(leaks)
    total = sum(x.count for x in leaks)
    out = [f"connwatch: {what} left {total} new live client{'s' if total != 1 else ''} behind "
           f"at {len(leaks)} call site{'s' if len(leaks) != 1 else ''}:"]
    for x in leaks:
        ups = ""
        if x.upstreams:
            ups = " to " + ", ".join(u for u, _n in sorted(x.upstreams, key=lambda un: -un[1])[:3])
        out.append(f"  +{x.count} {x.label()} at {x.where()}{ups} ({x.live} live there now)")
        if x.site is not None and x.site.traceback:
            out.append("    traceback (most recent call last):")
            out += [f"      {f}:{ln} in {fn}" for f, ln, fn in _frames(x.site)]
        out += [f"    held by: {path}" for path in x.retainers]
        if x.retainer_note:
            out.append(f"    held by: {x.retainer_note}")
    return "\n".join(out)


def ensure_enabled() -> bool:
    """Start the agent if it is not running; returns whether this call started it.

    Snapshot files stay as configured; without ``CONNWATCH_SNAPSHOT_INTERVAL`` none are
    written periodically (a check only needs in-process snapshots).
    """
    import connwatch

    if connwatch.is_enabled():
        return False
    overrides: Dict[str, Any] = {}
    if not os.environ.get("CONNWATCH_SNAPSHOT_INTERVAL"):
        overrides["snapshot_interval"] = 0
    return bool(connwatch.enable(**overrides))


class guard:
    """Fail when a block leaves new live clients: a context manager and a decorator.

        with connwatch.guard():
            client = make_client(); client.close()

        @connwatch.guard(allow={"socket/listener": 1}, grace=1.0)
        def test_server(): ...

        with connwatch.guard(max_created=5):   # no call site may build more than 5 clients
            for _ in range(20): requests.get(url)   # raises ChurnError, naming this line

    On exit (unless the block raised), waits up to ``grace`` seconds for asynchronous closes,
    then raises :class:`LeakError` naming each call site that holds more live clients than
    on entry, beyond ``allow`` (see :func:`find_leaks`) and the glob patterns of ``ignore``;
    with ``max_created``, :class:`ChurnError` (a LeakError) naming each call site that created
    more than that many clients inside the block, even if all were closed.
    Starts the agent if it is not running (and leaves it running).
    """

    def __init__(self, allow: Allow = 0, grace: float = DEFAULT_GRACE_S, ignore: Iterable[str] = (),
                 max_created: Optional[int] = None) -> None:
        if max_created is not None and (isinstance(max_created, bool) or not isinstance(max_created, int)
                                        or max_created < 0):
            raise ValueError(f"max_created must be a whole number 0 or more, not {max_created!r}")
        self.allow = allow
        self.grace = grace
        self.ignore = tuple(ignore)
        self.max_created = max_created
        self.leaks: Tuple[Leak, ...] = ()
        self.churned: Tuple[Churned, ...] = ()
        self._local = threading.local()

    def _stack(self) -> List[Snapshot]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def __enter__(self) -> guard:
        ensure_enabled()
        self._stack().append(_snapshot.take())
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        before = self._stack().pop()
        if exc_type is not None:
            return  # the block's own error says more than a leak would
        leaks, after = check(before, self.allow, self.ignore, self.grace)
        self.leaks = tuple(leaks)
        churned = find_churn(before, after, self.max_created, self.ignore)
        self.churned = tuple(churned)
        if leaks:
            message = format_leaks(leaks)
            if churned and self.max_created is not None:
                message += "\n" + format_churn(churned, self.max_created)
            raise LeakError(message, leaks, churned)
        if churned and self.max_created is not None:
            raise ChurnError(format_churn(churned, self.max_created), (), churned)

    def __call__(self, func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
