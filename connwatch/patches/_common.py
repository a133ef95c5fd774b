"""Shared machinery of the client patches: one constructor wrapper, one release wrapper.

Each client patch module declares a ``_TARGETS`` table of :class:`Target` rows and hands it
to a :class:`Patcher`, which wraps every row with ``wrapt`` when the row's module has been
imported and restores the exact originals on ``unpatch()``. The wrappers:

* ``INIT`` (a client class's ``__init__``): finds the call site, checks the caps *before* the
  original runs, calls the original, then tracks the instance. A thread-local depth counter
  makes a client built inside another wrapped constructor part of the outer one (the
  PoolManager inside a ``requests.Session`` is not a second client).
* ``CLOSE`` / ``ACLOSE`` (sync / async close methods): call the original, then release.
* ``NEST``: run the original with the depth raised, so clients it builds belong to its owner
  (the pools a urllib3 PoolManager makes for itself).

Hazards: wrappers run inside the app's calls, so every agent error is caught and logged once;
the only exception that may escape is ``ClientCapExceeded`` (raise mode, before the original).
Releases never depend on ``close()`` alone: every tracked object also has a weakref in the
registry, so a client dropped without ``close()`` is released (as ``gc_released``) on collection.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

import wrapt

from .. import _callsite, _limits, _log, _registry
from .._callsite import SLOTS, CallSite

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
    n = 0


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

def _release(instance: Any, where: str) -> None:
    if instance is None:
        return
    try:
        _registry.release(instance)
    except Exception:
        _log.internal_error(where)


def _make_init(kind: str, upstream: Optional[Upstream], rule: Optional[Rule], armed: _Armed) -> Any:
    depth = _depth
    where = f"{kind} constructor"

    def wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        site: Optional[CallSite] = None
        up: Optional[str] = None
        if not depth.n and armed.on and instance is not None:
            try:
                if not _registry.is_tracked(instance):  # __init__ run twice: one client
                    verdict = rule(sys._getframe(1)) if rule is not None else TRACK
                    if verdict == TRACK:
                        site = _callsite.find(2)
                    elif verdict == LIBRARY:
                        site = library_site(sys._getframe(1))
                    if site is not None and upstream is not None:
                        up = upstream(args, kwargs)
            except Exception:
                _log.internal_error(where)
                site = None
        # The cap check runs before the original: a refused client opens nothing.
        res = _limits.guarded_check(kind, site, up) if site is not None else None
        depth.n += 1
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            if res is not None:
                _registry.unreserve(res)
            raise
        finally:
            depth.n -= 1
        if site is not None:
            try:
                _registry.track(instance, kind, site, upstream=up, reservation=res)
            except Exception:
                _log.internal_error(where)
        return result

    return wrapper


def _make_close(kind: str, armed: _Armed) -> Any:
    where = f"{kind} close"

    def wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            return wrapped(*args, **kwargs)
        finally:
            if armed.on:
                _release(instance, where)

    return wrapper


def _make_aclose(kind: str, armed: _Armed) -> Any:
    where = f"{kind} close"

    async def wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            return await wrapped(*args, **kwargs)
        finally:
            if armed.on:
                _release(instance, where)

    return wrapper


def _make_nest(armed: _Armed) -> Any:
    depth = _depth

    def wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        depth.n += 1
        try:
            return wrapped(*args, **kwargs)
        finally:
            depth.n -= 1

    return wrapper


# --- patch / unpatch --------------------------------------------------------------------------

class Patcher:
    """Wraps a patch module's ``_TARGETS`` rows and restores them; idempotent, thread-safe.

    ``upstream`` maps a kind to a function of the constructor's ``(args, kwargs)``; ``rule``
    (optional) classifies the constructor's caller frame as TRACK, SKIP or LIBRARY.
    """

    def __init__(self, name: str, targets: Iterable[Target], upstream: Optional[Dict[str, Upstream]] = None,
                 rule: Optional[Rule] = None) -> None:
        self.name = name
        self.targets = tuple(targets)
        self.upstream = dict(upstream or {})
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
                wrapper = self._wrapper(t)
                wrapper.__name__ = wrapper.__qualname__ = f"_wrap_{t.owner}_{t.attr}".replace(".", "_")
                proxy = wrapt.wrap_function_wrapper(owner, t.attr, wrapper)
                self._originals[(owner, t.attr)] = (own, proxy)

    def _wrapper(self, t: Target) -> Any:
        if t.action == INIT:
            return _make_init(t.kind, self.upstream.get(t.kind), self.rule, self._armed)
        if t.action == CLOSE:
            return _make_close(t.kind, self._armed)
        if t.action == ACLOSE:
            return _make_aclose(t.kind, self._armed)
        if t.action == NEST:
            return _make_nest(self._armed)
        raise ValueError(f"unknown action {t.action!r}")

    def unpatch(self) -> None:
        """Restore the exact originals (idempotent).

        If someone wrapped one of our wrappers after us, that attribute is left alone (removing
        ours would drop theirs) and our wrapper is disarmed: it then just calls through.
        """
        with self._lock:
            self._armed.on = False
            for (owner, attr), (own, proxy) in list(self._originals.items()):
                current = owner.__dict__.get(attr, _MISSING)
                if current is proxy:
                    if own is _MISSING:
                        delattr(owner, attr)
                    else:
                        setattr(owner, attr, own)
                else:
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
    """Whether ``obj`` is a wrapt proxy (wrapt 2 proxies derive from BaseObjectProxy)."""
    base = getattr(wrapt, "BaseObjectProxy", None) or wrapt.ObjectProxy
    return isinstance(obj, base)
