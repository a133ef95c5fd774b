"""Shared machinery of the client patches: one constructor wrapper, one release wrapper.

Each client patch module declares a ``_TARGETS`` table of :class:`Target` rows and hands it
to a :class:`Patcher`, which replaces every row's method, once the row's module has been
imported, with a plain function set on the owner class (``setattr``), and restores the exact
originals on ``unpatch()``. Plain functions, not wrapt proxies: a wrapt 2 FunctionWrapper costs
~400 ns per call where a plain pass-through function costs ~50-100 ns, a ``requests.get()``
runs ~9 of them, and importing wrapt 2 costs ~50 ms. A wrapper gets the instance as its first
positional argument, called on an instance or through the class alike
(``PoolManager.__init__(self, ...)`` in a subclass, ``super()``), carries the original's name,
doc and signature (``functools.wraps``; ``ACLOSE`` wrappers are coroutine functions), and is
marked ``__connwatch_patch__``. The original may be the owner's own function or an inherited
one (``unpatch()`` then deletes our attribute); another library's method proxy installed
before us (a wrapt FunctionWrapper) is called through its ``__get__``. A row whose attribute
is anything else (staticmethod, classmethod, property, missing) is skipped with one warning.
The wrappers:

* ``INIT`` (a client class's ``__init__``): calls the original, then finds the call site (the
  caller's frames are the same) and tracks the instance. With a cap configured, the call site
  is found and the caps checked *before* the original runs, so a refused client opens nothing.
  A thread-local depth counter makes a client built inside another wrapped constructor part of
  the outer one (the PoolManager inside a ``requests.Session`` is not a second client).
* ``CLOSE`` / ``ACLOSE`` (sync / async close methods): call the original, then release.
* ``NEST``: run the original with the depth raised, so clients it builds belong to its owner
  (the pools a urllib3 PoolManager makes for itself).

Hazards: wrappers run inside the app's calls, so every agent error is caught and logged once;
the only exception that may escape is ``ClientCapExceeded`` (raise mode, before the original).
Releases never depend on ``close()`` alone: every tracked object also has a weakref in the
registry, so a client dropped without ``close()`` is released (as ``gc_released``) on collection.
"""

from __future__ import annotations

import functools
import sys
import threading
from dataclasses import dataclass
from types import FrameType, FunctionType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

from .. import _callsite, _limits, _log, _registry
from .._callsite import SLOTS, CallSite
from ._c import W_CLOSE, W_INIT, W_NEST, C

INIT = "init"
CLOSE = "close"
ACLOSE = "aclose"
NEST = "nest"

# What a patch's caller rule says about a constructor call (see Patcher's ``rule``).
TRACK = 0  # the normal case: track at the first user frame
SKIP = 1  # part of a client the library already owns: do not track
LIBRARY = 2  # the library's own object (module level): track at that library frame, marked library

_MISSING = object()
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}

Upstream = Callable[[Tuple[Any, ...], Dict[str, Any]], Optional[str]]
Rule = Callable[[FrameType], int]


@dataclass(frozen=True, **SLOTS)
class Target:
    """One method to wrap: ``module.owner.attr``, what the wrapper does, and the client kind."""

    module: str
    owner: str
    attr: str
    action: str
    kind: str = ""


class _Depth(threading.local):
    """``c[0]``: how many wrapped constructors (and NEST calls) run on this thread. One list per
    thread, so a wrapper reads the thread-local once (~30 ns per access) and bumps an item."""

    def __init__(self) -> None:
        self.c = [0]


# Constructors of wrapped clients running on this thread (shared by every patch module, so a
# client of one library built inside another library's client belongs to the outer one).
_depth = _Depth()


class _Armed:
    """Whether one generation of wrappers is live (False once unpatched)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


# --- upstream helpers (never return credentials, paths or query strings) ----------------------

def host_port(host: Any, port: Any) -> Optional[str]:
    """``host:port`` (``[v6]:port``), or None when the host is unknown."""
    if host is None:
        return None
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip()
    if not host:
        return None
    if "@" in host:
        host = host.rpartition("@")[2]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}" if port is not None else host


def url_upstream(url: Any) -> Optional[str]:
    """``host:port`` of an absolute URL (str, httpx.URL, yarl.URL...); None if it has no host."""
    if url is None:
        return None
    text = str(url)
    if "//" not in text:
        return None
    parts = urlsplit(text)
    host = parts.hostname
    if not host:
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme.lower())
    return host_port(host, port)


def arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, name: str) -> Any:
    """A constructor argument given by position ``index`` or keyword ``name`` (else None)."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def library_site(frame: FrameType) -> Optional[CallSite]:
    """An interned call site at a library frame, marked ``library`` (never blamed on the app);
    None for the agent's own objects."""
    return _callsite.library_site(frame)


# --- the wrappers -----------------------------------------------------------------------------
# Every factory takes ``call``, the original, and binds what the wrapper uses to closure
# variables (no global or attribute lookups per call; close() may also run during interpreter
# shutdown, when module globals are being cleared). A wrapper takes ``*args, **kwargs`` with
# ``self`` as ``args[0]`` (bound or called through the class alike) and hands the same tuple on:
# no second tuple per call, and ``call(*args)`` when there are no keywords (~50 ns less than a
# ``self, *args, **kwargs`` pass-through). With no positional argument at all the original
# raises its own TypeError and the wrapper does nothing else.

def _make_init(call: Callable[..., Any], kind: str, upstream: Optional[Upstream], rule: Optional[Rule],
               armed: _Armed) -> Callable[..., Any]:
    depth = _depth
    where = f"{kind} constructor"
    getframe = sys._getframe
    find, lib_site = _callsite.find, _callsite.library_site
    is_tracked, track, unreserve = _registry.is_tracked, _registry.track, _registry.unreserve
    guarded_check = _limits.guarded_check
    limits = _limits
    internal_error = _log.internal_error

    def site_of(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Optional[CallSite], Optional[str]]:
        # (call site, upstream) of a client made by init's caller, or (None, None)
        site: Optional[CallSite] = None
        up: Optional[str] = None
        try:
            if armed.on and not is_tracked(args[0]):  # __init__ run twice: one client
                verdict = rule(getframe(2)) if rule is not None else TRACK
                if verdict == TRACK:
                    site = find(3)
                elif verdict == LIBRARY:
                    site = lib_site(getframe(2))
                if site is not None and upstream is not None:
                    up = upstream(args[1:], kwargs)
        except Exception:
            internal_error(where)
            return None, None
        return site, up

    def init(*args: Any, **kwargs: Any) -> Any:
        n = depth.c
        outer = not n[0] and args
        if limits._policy is None:
            # No cap: the original first, then the call site (the frames are the same), so the
            # agent adds nothing between the app's call and the library's own work.
            n[0] += 1
            try:
                result = call(*args, **kwargs) if kwargs else call(*args)
            finally:
                n[0] -= 1
            if outer:
                site, up = site_of(args, kwargs)
                if site is not None:
                    try:
                        track(args[0], kind, site, upstream=up)
                    except Exception:
                        internal_error(where)
            return result
        site, up = site_of(args, kwargs) if outer else (None, None)
        # The cap check runs before the original: a refused client opens nothing.
        res = guarded_check(kind, site, up) if site is not None else None
        n[0] += 1
        try:
            result = call(*args, **kwargs) if kwargs else call(*args)
        except BaseException:
            if res is not None:
                unreserve(res)
            raise
        finally:
            n[0] -= 1
        if site is not None:
            try:
                track(args[0], kind, site, upstream=up, reservation=res)
            except Exception:
                internal_error(where)
        return result

    return init


def _make_close(call: Callable[..., Any], kind: str, armed: _Armed) -> Callable[..., Any]:
    where = f"{kind} close"
    release = _registry.release
    internal_error = _log.internal_error

    def close(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs) if kwargs else call(*args)
        finally:
            if armed.on and args:
                try:
                    release(args[0])
                except Exception:
                    internal_error(where)

    return close


def _make_aclose(call: Callable[..., Any], kind: str, armed: _Armed) -> Callable[..., Any]:
    where = f"{kind} close"
    release = _registry.release
    internal_error = _log.internal_error

    async def aclose(*args: Any, **kwargs: Any) -> Any:
        try:
            return await (call(*args, **kwargs) if kwargs else call(*args))
        finally:
            if armed.on and args:
                try:
                    release(args[0])
                except Exception:
                    internal_error(where)

    return aclose


def _make_nest(call: Callable[..., Any]) -> Callable[..., Any]:
    depth = _depth

    def nest(*args: Any, **kwargs: Any) -> Any:
        n = depth.c
        n[0] += 1
        try:
            return call(*args, **kwargs) if kwargs else call(*args)
        finally:
            n[0] -= 1

    return nest


MISSING = _MISSING  # "the owner had no attribute of its own": what restore() deletes back to


def restore(owner: Any, attr: str, ours: Any, own: Any) -> bool:
    """Put ``own`` (or MISSING: nothing) back as ``owner.attr`` if our wrapper ``ours`` is still
    there; False (and nothing touched) when someone replaced it since."""
    if owner.__dict__.get(attr, _MISSING) is not ours:
        return False
    if own is _MISSING:
        delattr(owner, attr)
    else:
        setattr(owner, attr, own)
    return True


def _lookup(owner: type, attr: str) -> Any:
    """The raw class attribute ``attr`` of ``owner`` (its own or inherited; no descriptor call)."""
    for klass in owner.__mro__:
        found = klass.__dict__.get(attr, _MISSING)
        if found is not _MISSING:
            return found
    return _MISSING


def _caller(raw: Any) -> Optional[Callable[..., Any]]:
    """What a wrapper calls as ``call(self, *args, **kwargs)`` to run the original; None when
    ``raw`` is not a method we can stand in for."""
    if type(raw) is FunctionType:
        return raw  # every current row: a plain function, called directly
    if isinstance(raw, (staticmethod, classmethod, type)) or not callable(raw) or not hasattr(type(raw), "__get__"):
        return None  # no first ``self`` to take (or not a method at all): not ours to replace
    # Another library's method proxy (a wrapt FunctionWrapper installed before us): bind it the
    # way attribute access would, so its own wrapper still sees the instance.
    get = type(raw).__get__

    def bound(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        return get(raw, self, type(self))(*args, **kwargs)

    return bound


# --- patch / unpatch --------------------------------------------------------------------------

class Patcher:
    """Wraps a patch module's ``_TARGETS`` rows and restores them; idempotent, thread-safe.

    ``upstream`` maps a kind to a function of the constructor's ``(args, kwargs)``; ``rule``
    (optional) classifies the constructor's caller frame as TRACK, SKIP or LIBRARY.
    """

    def __init__(self, name: str, targets: Iterable[Target], upstream: Optional[Dict[str, Upstream]] = None,
                 rule: Optional[Rule] = None,
                 upstream_cache: Optional[Dict[str, Tuple[int, str, Dict[Any, Optional[str]]]]] = None) -> None:
        self.name = name
        self.targets = tuple(targets)
        self.upstream = dict(upstream or {})
        # kind -> (position after self, keyword name, {argument: upstream}): the cache an upstream
        # function keeps for the argument that names the upstream; the C wrapper reads it first.
        self.upstream_cache = dict(upstream_cache or {})
        self.rule = rule
        self._lock = threading.RLock()
        self._armed = _Armed()
        # (owner class, attr) -> (what the owner's own __dict__ had, the wrapper we installed)
        self._originals: Dict[Tuple[type, str], Tuple[Any, Any]] = {}

    def is_patched(self) -> bool:
        """Whether any row is currently wrapped."""
        return bool(self._originals)

    def patch(self, modules: Optional[Iterable[str]] = None) -> None:
        """Wrap every row whose module is imported (only ``modules``' rows, if given)."""
        wanted = None if modules is None else set(modules)
        with self._lock:
            if not self._originals:
                self._armed = _Armed()
            for t in self.targets:
                if wanted is not None and t.module not in wanted:
                    continue
                module = sys.modules.get(t.module)
                if module is None:
                    continue
                owner = _resolve(module, t.owner)
                if owner is None or (owner, t.attr) in self._originals:
                    continue
                own = owner.__dict__.get(t.attr, _MISSING)
                raw = own if own is not _MISSING else _lookup(owner, t.attr)
                call = _caller(raw)
                if call is None:
                    _log.warn_once(f"patch:{self.name}:{t.module}.{t.owner}.{t.attr}",
                                   "%s.%s (%s) is not a method connwatch can wrap: left alone, so %s clients "
                                   "may go untracked", t.owner, t.attr,
                                   "missing" if raw is _MISSING else type(raw).__name__, t.kind or self.name)
                    continue
                wrapper = functools.wraps(raw)(self._wrapper(t, call))
                setattr(wrapper, "__connwatch_patch__", True)
                try:
                    setattr(owner, t.attr, wrapper)
                except Exception:  # an immutable (extension) type, say
                    _log.internal_error(f"patching {t.owner}.{t.attr}")
                    continue
                self._originals[(owner, t.attr)] = (own, wrapper)

    def _wrapper(self, t: Target, call: Callable[..., Any]) -> Callable[..., Any]:
        if t.action == INIT:
            if C is not None:
                up: Any = self.upstream.get(t.kind)
                cache = self.upstream_cache.get(t.kind)
                if up is not None and cache is not None:
                    up = (up, cache)
                return C.wrapper(W_INIT, call, t.kind, up, self.rule, self._armed,  # type: ignore[no-any-return]
                                 f"{t.kind} constructor", None)
            return _make_init(call, t.kind, self.upstream.get(t.kind), self.rule, self._armed)
        if t.action == CLOSE:
            if C is not None:
                return C.wrapper(W_CLOSE, call, t.kind, None, None, self._armed,  # type: ignore[no-any-return]
                                 f"{t.kind} close", None)
            return _make_close(call, t.kind, self._armed)
        if t.action == ACLOSE:
            return _make_aclose(call, t.kind, self._armed)
        if t.action == NEST:
            if C is not None:
                return C.wrapper(W_NEST, call, "", None, None, None, "nest", None)  # type: ignore[no-any-return]
            return _make_nest(call)
        raise ValueError(f"unknown action {t.action!r}")

    def unpatch(self) -> None:
        """Restore the exact originals (idempotent).

        If someone wrapped one of our wrappers after us, that attribute is left alone (removing
        ours would drop theirs) and our wrapper is disarmed: it then just calls through.
        """
        with self._lock:
            self._armed.on = False
            for (owner, attr), (own, ours) in list(self._originals.items()):
                if not restore(owner, attr, ours, own):
                    _log.warn_once(f"unpatch:{self.name}:{attr}",
                                   "%s.%s was re-wrapped by someone else; connwatch's wrapper is left in place, "
                                   "disarmed", getattr(owner, "__qualname__", owner), attr)
            self._originals.clear()

    def functions(self) -> Tuple[Callable[[], bool], Callable[..., None], Callable[[], None]]:
        """The patch module contract for a module whose rows all load with its library:
        ``is_patched()``, ``patch(module=None)`` (idempotent) and ``unpatch()``."""

        def is_patched() -> bool:
            """Whether this library's classes are wrapped."""
            return self.is_patched()

        def patch(module: Any = None) -> None:
            """Wrap this library's client classes (idempotent)."""
            self.patch()

        def unpatch() -> None:
            """Restore the exact originals (idempotent)."""
            self.unpatch()

        return is_patched, patch, unpatch

    def wrapped_attrs(self) -> List[Tuple[type, str]]:
        """The (owner, attr) pairs currently wrapped (tests)."""
        return list(self._originals)


def _resolve(module: Any, dotted: str) -> Optional[type]:
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) else None


def is_wrapper(obj: Any) -> bool:
    """Whether ``obj`` is one of connwatch's wrappers (not another library's proxy of one)."""
    if type(obj) is not FunctionType and (C is None or type(obj) is not C.Wrapper):
        return False
    return obj.__dict__.get("__connwatch_patch__") is True
