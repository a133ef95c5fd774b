"""Patch for uvloop: the connections, listeners and accepted connections a uvloop loop opens.

uvloop opens them in libuv (C): there is no Python socket object for the socket patch to see.
So the loop's own methods are wrapped, as plain functions set on ``uvloop.Loop`` (the Python
subclass that ``uvloop.new_event_loop``, ``uvloop.run`` and ``uvloop.EventLoopPolicy`` build;
``uvloop.loop.Loop`` itself is an immutable extension type). The records are asyncio's: kind
``socket`` with role ``client``, ``listener`` or ``accepted``, at the first user frame, with the
peer's ``host:port`` (``unix:/path``) as upstream.

* ``create_connection`` / ``create_unix_connection`` (``asyncio.open_connection`` and
  ``open_unix_connection`` call them): the call site is found and the caps checked when the
  wrapper starts, before uvloop opens anything (a refused client opens nothing); once connected
  the transport is tracked as a ``client``. With a host name (resolved by libuv) the upstream
  is known only once connected: the per-upstream cap is checked then, and a refused connection
  is aborted before the app sees it.
* ``create_server`` / ``create_unix_server`` (``start_server``, ``start_unix_server``): one
  ``listener`` per listening socket, at the call site; each accepted connection is an
  ``accepted`` socket, attributed as asyncio's are (the first user frame when the loop accepts:
  the line that runs the loop).
* ``sock=`` arguments: the app's own socket is already counted by the socket patch (uvloop
  detaches it when the transport closes, which releases it); it is not counted twice. A server
  on such a socket makes it a ``listener``, as asyncio's ``listen()`` would.

Releases. uvloop's transports cannot be patched (immutable type) but call their protocol's
``connection_lost`` when they close: the protocol's class gets a wrapper of it (once per class)
that calls the original, then releases what a side table holds for that protocol instance (see
"releases" below). TCP and Unix transports are weak-referenced, so
one that is collected unclosed is released as collected; TLS transports cannot be weakly
referenced, so a small stand-in held by the protocol's hook is tracked instead. A listener's
record is held by the protocol factory uvloop keeps on its listening handle: when libuv has
closed the handle (the loop iteration after ``Server.close()``) the factory is freed and its
listeners released. Connectionless (``create_datagram_endpoint``) and pipe transports are not
counted. Triggered by the import of ``uvloop``; connwatch never imports it.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import weakref
from types import FunctionType

from .. import _callsite, _limits, _log, _registry
from .._upstream import upstream_of
from . import _uvloop_agent, stdlib_socket
from ._common import MISSING as _MISSING
from ._common import host_port, restore

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Tuple

MODULE = "uvloop"
KIND = "socket"

# Sockets Python makes inside the functions of _uvloop_agent are uvloop's own (see there).
_callsite.mark_agent_code(_uvloop_agent.call.__code__.co_filename)


class _Armed:
    """Whether one generation of wrappers is live (False once unpatched)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


class _Conn:
    """Stands in for a transport that cannot be weakly referenced (uvloop's TLS transports)."""

    __slots__ = ("__weakref__",)


class _Listener:
    """Stands in for one listening socket (a libuv handle, not a Python object)."""

    __slots__ = ("__weakref__",)


_lock = threading.Lock()
_armed = _Armed()
_owner: Any = None
# attribute -> (what uvloop.Loop's own __dict__ had, the wrapper we installed)
_installed: Dict[str, Tuple[Any, Any]] = {}
# transport type -> whether it can be weakly referenced
_weakrefable: Dict[type, bool] = {}


def _is_ip(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            continue
    return False


# --- descriptors owned by uvloop's handles -----------------------------------------------------
# uvloop's PseudoSocket methods (getsockname, setsockopt... on ``server.sockets[i]`` or
# ``transport.get_extra_info("socket")``) build a Python socket on the handle's descriptor and
# detach it: the socket patch would count a client or listener created and closed per call. The
# descriptors of the handles counted here are lent to the socket patch (stdlib_socket.borrowed)
# so such views are not counted. An entry goes when its connection is lost or its object is
# collected, before libuv closes the descriptor (a listener's goes when its handle is freed,
# one loop iteration after the close).
#
# A connection's descriptor is looked up only when a view could need it: asking the transport
# for it (get_extra_info("socket")) costs a getsockname() system call and a PseudoSocket per
# connection, most of the hook's cost. Connections are kept in _unlent until the socket patch
# meets a socket built on an existing descriptor with no role hint (what a view is), which
# first calls _lend_pending (registered in stdlib_socket.lenders): every connection still open
# is then looked up once and lent.

def _fd_of(transport_or_socket: Any) -> int:
    try:
        ps = transport_or_socket if hasattr(transport_or_socket, "fileno") else \
            _uvloop_agent.extra_info(transport_or_socket, "socket")
        return int(ps.fileno()) if ps is not None else -1
    except Exception:
        return -1


class _Lent(weakref.ref):
    """A weak reference to an object whose descriptor is lent, dropping its entry when collected."""

    __slots__ = ("fd",)
    fd: int


def _lent_gone(ref: Any) -> None:
    borrowed, fd = stdlib_socket.borrowed, ref.fd
    if borrowed.get(fd) is ref:
        del borrowed[fd]


def _lend(fd: int, obj: Any) -> None:
    if fd < 0:
        return
    ref = _Lent(obj, _lent_gone)
    ref.fd = fd
    stdlib_socket.borrowed[fd] = ref


def _give_back(fd: int, obj: Any) -> None:
    ref = stdlib_socket.borrowed.get(fd)
    if ref is not None and ref() is obj:
        del stdlib_socket.borrowed[fd]


def _lend_pending() -> None:
    """Look up and lend the descriptors of the connections still in _unlent (each once)."""
    while _unlent:
        try:
            _key, entry = _unlent.popitem()
        except KeyError:
            return  # emptied by another thread meanwhile
        try:
            transport = entry.held()
            if transport is None or entry() is None or transport.is_closing():
                continue  # gone, or closing: libuv closes its descriptor, there is nothing to lend
            fd = _fd_of(transport)
            if fd >= 0:
                entry.fd = fd
                _lend(fd, transport)
        except Exception:
            _log.internal_error("uvloop descriptors")


stdlib_socket.lenders.append(_lend_pending)


# --- releases --------------------------------------------------------------------------------
# uvloop's transports cannot be patched, but call their protocol's connection_lost when they
# close (and connection_made when an accepted one is set up). The protocol's *class* gets a
# wrapper of each, once per class (restored by unpatch); what a given protocol instance should
# release or track is kept in a side table keyed by its id, checked against a weak reference
# and dropped when the protocol is collected. (A hook in each instance's __dict__ instead costs
# ~4 times as much per connection: it gives up CPython's inline attribute values of the object.)

class _Entry(weakref.ref):
    """A weak reference to a protocol, holding what its hooked method should do for it: an entry
    of _lost or _made (by the protocol's id), dropped when the protocol is collected. One class
    and one module-level callback: no closure per connection."""

    __slots__ = ("count", "fd", "held", "key")
    key: int
    held: Any
    fd: int
    count: bool


# id(protocol) -> its entry: held is the tracked object (a stand-in) or a weakref to it (the
# transport), fd its lent descriptor (-1: none lent), count whether it is counted here
_lost: Dict[int, _Entry] = {}
# id(protocol) -> the entry (held: the call site) of an accepted connection's protocol, until made
_made: Dict[int, _Entry] = {}
# id(protocol) -> its entry of _lost, while its transport's descriptor is not looked up (see above)
_unlent: Dict[int, _Entry] = {}
# (protocol class, "connection_lost"/"connection_made") -> (its own attribute, our wrapper)
_classes: Dict[Tuple[type, str], Tuple[Any, Any]] = {}
# protocol class -> whether its connection_lost releases (weakly referenceable and wrapped)
_lost_hookable: Dict[type, bool] = {}


def _lost_gone(ref: Any) -> None:
    key = ref.key
    if _lost.get(key) is ref:
        del _lost[key]
    if _unlent.get(key) is ref:
        del _unlent[key]


def _made_gone(ref: Any) -> None:
    key = ref.key
    if _made.get(key) is ref:
        del _made[key]


def _lookup(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return _MISSING


def _class_hook(cls: type, name: str, after: Optional[Callable[[Any, Any], None]]) -> bool:
    """Make ``cls.<name>(self, arg)`` call ``after(self, arg)`` once the original returned or
    raised (inherited from a wrapped class: nothing to do). False if it cannot be wrapped.
    ``after=None``: connection_lost's release, done inline in the wrapper (every connection
    passes there): the protocol's _lost entry, if it is this protocol's, gives back the
    descriptor and releases the tracked object."""
    key = (cls, name)
    if key in _classes:
        return True
    raw = _lookup(cls, name)
    if getattr(raw, "__connwatch_patch__", False):
        return True  # inherited from a class we wrapped: that wrapper runs
    if type(raw) is not FunctionType:
        return False  # a C method, staticmethod, property...: not ours to stand in for
    internal_error = _log.internal_error
    wrapper: Any

    if after is None:
        lost, unlent, release, give_back, conn = _lost, _unlent, _registry.release, _give_back, _Conn

        @functools.wraps(raw)
        def wrapper(self: Any, arg: Any) -> Any:
            try:
                return raw(self, arg)
            finally:
                try:
                    entry = lost.pop(id(self), None)
                    if entry is not None:
                        if entry() is not self:
                            lost[id(self)] = entry  # another object's (ids are reused): not this one's
                        else:
                            if unlent:
                                unlent.pop(id(self), None)
                            held = entry.held
                            target = held if type(held) is conn else held()
                            if target is not None:
                                if entry.fd >= 0:
                                    give_back(entry.fd, target)
                                if entry.count:
                                    release(target)
                except Exception:
                    internal_error(f"uvloop {name}")
    else:
        @functools.wraps(raw)
        def wrapper(self: Any, arg: Any) -> Any:
            try:
                return raw(self, arg)
            finally:
                try:
                    after(self, arg)
                except Exception:
                    internal_error(f"uvloop {name}")

    wrapper.__connwatch_patch__ = True
    own = cls.__dict__.get(name, _MISSING)
    try:
        setattr(cls, name, wrapper)
    except Exception:
        return False  # an immutable (extension) type
    _classes[key] = (own, wrapper)
    return True


def _hookable(cls: type) -> bool:
    """Whether protocols of ``cls`` can release their connection from connection_lost."""
    ok = _lost_hookable.get(cls)
    if ok is None:
        ok = _lost_hookable[cls] = cls.__weakrefoffset__ != 0 and _class_hook(cls, "connection_lost", None)
    return ok


def _hook_lost(protocol: Any, obj: Any, fd: int, count: bool = True) -> bool:
    """Make ``protocol``'s connection_lost release ``obj`` (held weakly when it can be, else
    strongly until then: a stand-in) and give back its descriptor ``fd`` (-2: not looked up yet,
    see _unlent). False if it cannot be."""
    if not _hookable(type(protocol)):
        return False
    key = id(protocol)
    entry = _Entry(protocol, _lost_gone)
    entry.key = key
    entry.count = count
    if fd == -2:
        entry.held = weakref.ref(obj)
        entry.fd = -1
        _lost[key] = entry
        _unlent[key] = entry
    else:
        entry.held = obj if type(obj) is _Conn else weakref.ref(obj)
        entry.fd = fd
        _lost[key] = entry
    return True


def _tracked_object(transport: Any) -> Any:
    """The object to track for ``transport``: itself, or a stand-in if it cannot be weak-referenced."""
    t = type(transport)
    ok = _weakrefable.get(t)
    if ok is None:
        ok = _weakrefable[t] = t.__weakrefoffset__ != 0
    return transport if ok else _Conn()


def _track_transport(transport: Any, protocol: Any, site: Any, role: str, upstream: Optional[str],
                     reservation: Any = None) -> None:
    if _weakrefable.get(type(transport)) and _lost_hookable.get(type(protocol)):
        # the usual case (both known from an earlier connection): released by connection_lost,
        # the descriptor looked up only if a view needs it; _hook_lost(protocol, transport, -2) inline
        key = id(protocol)
        entry = _Entry(protocol, _lost_gone)
        entry.key, entry.held, entry.fd, entry.count = key, weakref.ref(transport), -1, True
        _lost[key] = entry
        _unlent[key] = entry
        _registry.track(transport, KIND, site, role, upstream, reservation)
        return
    obj = _tracked_object(transport)
    if obj is transport and _hookable(type(protocol)):
        _hook_lost(protocol, obj, -2)
        _registry.track(obj, KIND, site, role, upstream, reservation)
        return
    fd = _fd_of(transport)
    if not _hook_lost(protocol, obj, fd):
        name = type(protocol).__qualname__
        if type(obj) is _Conn:  # neither weakly referenceable nor hookable: nothing could release it
            _log.warn_once(f"uvloop:untrackable:{name}", "uvloop: %s connections with protocol %s are not "
                           "counted (its connection_lost cannot be wrapped)", role, name)
            if reservation is not None:
                _registry.unreserve(reservation)
            return
        _log.warn_once(f"uvloop:nohook:{name}", "uvloop: the connection_lost of protocol %s cannot be wrapped: "
                       "its connections are released only when collected", name)
    _registry.track(obj, KIND, site, role, upstream, reservation)
    _lend(fd, obj)


# --- accepted connections and listeners ------------------------------------------------------

class _Factory:
    """The protocol factory handed to uvloop's server: makes each accepted connection's protocol
    count its transport, and holds the server's listener records (released when uvloop frees
    its listening handles, the only holders of this object)."""

    __slots__ = ("__weakref__", "factory", "listeners")

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.listeners: List[_Listener] = []

    def __call__(self) -> Any:
        protocol = self.factory()
        try:
            if _armed.on:
                site = _callsite.find(2)  # as asyncio's accept: the first user frame (the loop's runner)
                if site is not None:
                    _hook_made(protocol, site)
        except Exception:
            _log.internal_error("uvloop accept")
        return protocol

    def __del__(self) -> None:
        try:
            for listener in self.listeners:
                _registry.release(listener)
            self.listeners = []
        except Exception:
            pass  # interpreter shutdown: the registry may be gone


def _after_made(protocol: Any, transport: Any) -> None:
    key = id(protocol)
    entry = _made.pop(key, None)
    if entry is None:
        return
    if entry() is not protocol:
        _made[key] = entry
        return
    _track_transport(transport, protocol, entry.held, "accepted", None)


def _hook_made(protocol: Any, site: Any) -> None:
    if type(protocol).__weakrefoffset__ == 0 or not _class_hook(type(protocol), "connection_made", _after_made):
        name = type(protocol).__qualname__
        _log.warn_once(f"uvloop:nomade:{name}", "uvloop: the connection_made of protocol %s cannot be wrapped: "
                       "its accepted connections are not counted", name)
        return
    key = id(protocol)
    entry = _Entry(protocol, _made_gone)
    entry.key = key
    entry.held = site
    _made[key] = entry


# --- the wrappers ----------------------------------------------------------------------------

# (host, port) of create_connection -> (its upstream, the same if host is an IP literal else
# None: a name, checked once resolved); bounded like _upstream.cache
_targets: Dict[Tuple[Any, Any], Tuple[Optional[str], Optional[str]]] = {}


def _target(host: Any, port: Any) -> Tuple[Optional[str], Optional[str]]:
    requested = host_port(host, port)
    out = (requested, requested if _is_ip(host) else None)
    try:
        if len(_targets) >= 4096:
            _targets.clear()
        _targets[(host, port)] = out
    except TypeError:
        pass  # unhashable: formatted every time
    return out


def _connected(result: Any, site: Any, checked: Optional[str], requested: Optional[str], res: Any,
               unix: bool) -> None:
    """Track the transport of a new connection (``result`` is uvloop's (transport, protocol)).
    May raise ClientCapExceeded (raise mode) for a host name whose resolved upstream is over its
    cap; the connection is then aborted."""
    transport, protocol = result
    upstream = requested
    if checked is None and not unix:  # a host name: the peer's address (an IP literal is the peer's)
        try:
            peer = _uvloop_agent.extra_info(transport, "peername")
            if peer:
                upstream = upstream_of(peer)
        except Exception:
            pass
    policy = _limits._policy
    if upstream != checked and policy is not None and policy.per_upstream is not None:
        try:
            again = _limits.check_upstream(KIND, site, upstream)
        except _limits.ClientCapExceeded:
            if res is not None:
                _registry.unreserve(res)
            transport.abort()
            raise
        if again is not None:
            if res is not None:
                _registry.unreserve(res)
            res = again
    _track_transport(transport, protocol, site, "client", upstream, res)


def _wrap_create_connection(original: Callable[..., Any], unix: bool) -> Callable[..., Any]:
    armed = _armed
    find, guarded_check, limits = _callsite.find, _limits.guarded_check, _limits
    unreserve, internal_error = _registry.unreserve, _log.internal_error
    where = "uvloop create_unix_connection" if unix else "uvloop create_connection"
    targets = _targets
    track_transport, track = _track_transport, _registry.track
    weakrefable, lost_hookable, lost, unlent = _weakrefable, _lost_hookable, _lost, _unlent
    new_entry, lost_gone, ref = _Entry, _lost_gone, weakref.ref

    async def create_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        site: Any = None
        res: Any = None
        checked = requested = None
        try:
            if armed.on and (not kwargs or kwargs.get("sock") is None):
                if unix:
                    path = args[1] if len(args) > 1 else kwargs.get("path")
                    if path is not None:
                        requested = checked = upstream_of(os.fspath(path))
                        site = find(2)
                else:
                    host = args[1] if len(args) > 1 else kwargs.get("host")
                    port = args[2] if len(args) > 2 else kwargs.get("port")
                    if host is not None or port is not None:
                        try:
                            requested, checked = targets[(host, port)]
                        except (KeyError, TypeError):
                            requested, checked = _target(host, port)
                        site = find(2)
        except Exception:
            internal_error(where)
            site = None
        if site is None:
            result = await original(self, *args, **kwargs)
            sock = kwargs.get("sock")
            if sock is not None and armed.on:
                try:
                    transport, protocol = result
                    fd = _fd_of(transport)
                    _lend(fd, transport)
                    _hook_lost(protocol, transport, fd, count=False)
                except Exception:
                    internal_error(where)
            return result
        # may raise ClientCapExceeded, before uvloop opens anything
        res = guarded_check(KIND, site, checked) if limits._policy is not None else None
        try:
            result = await (original(self, *args, **kwargs) if kwargs else original(self, *args))
        except BaseException:
            if res is not None:
                unreserve(res)
            raise
        try:
            if checked is not None:  # the upstream was known (and checked) before connecting
                transport, protocol = result
                if weakrefable.get(type(transport)) and lost_hookable.get(type(protocol)):
                    # _track_transport's usual case, inline: this is every connection
                    key = id(protocol)
                    entry = new_entry(protocol, lost_gone)
                    entry.key, entry.held, entry.fd, entry.count = key, ref(transport), -1, True
                    lost[key] = entry
                    unlent[key] = entry
                    track(transport, KIND, site, "client", checked, res)
                else:
                    track_transport(transport, protocol, site, "client", checked, res)
            else:
                _connected(result, site, checked, requested, res, unix)
        except _limits.ClientCapExceeded:
            raise
        except Exception:
            internal_error(where)
        return result

    return create_connection


def _wrap_create_server(original: Callable[..., Any], unix: bool) -> Callable[..., Any]:
    armed = _armed
    find, internal_error = _callsite.find, _log.internal_error
    where = "uvloop create_unix_server" if unix else "uvloop create_server"
    call = _uvloop_agent.call

    async def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
        factory: Optional[_Factory] = None
        site: Any = None
        sock: Any = None
        try:
            if armed.on and (args or "protocol_factory" in kwargs):
                site = find(2)
                if site is not None:
                    if args:
                        factory = _Factory(args[0])
                        args = (factory, *args[1:])
                    else:
                        factory = _Factory(kwargs["protocol_factory"])
                        kwargs = {**kwargs, "protocol_factory": factory}
                    sock = kwargs.get("sock")
        except Exception:
            internal_error(where)
        if factory is None:
            return await original(self, *args, **kwargs)
        server = await call(original, (self, *args), kwargs)
        try:
            if sock is not None:
                _registry.set_role(sock, "listener", None)  # the app's socket, as listen() makes it
            else:
                for fd in _uvloop_agent.listener_fds(server):
                    listener = _Listener()
                    factory.listeners.append(listener)
                    _registry.track(listener, KIND, site, "listener", None)
                    _lend(fd, listener)
        except Exception:
            internal_error(where)
        return server

    return create_server


# attribute of uvloop.Loop -> wrapper factory
_TARGETS: Tuple[Tuple[str, Callable[[Callable[..., Any]], Callable[..., Any]]], ...] = (
    ("create_connection", lambda o: _wrap_create_connection(o, unix=False)),
    ("create_unix_connection", lambda o: _wrap_create_connection(o, unix=True)),
    ("create_server", lambda o: _wrap_create_server(o, unix=False)),
    ("create_unix_server", lambda o: _wrap_create_server(o, unix=True)),
)


def is_patched() -> bool:
    """Whether uvloop's loop class is wrapped."""
    return bool(_installed)


def patch(module: Any = None) -> None:
    """Wrap ``uvloop.Loop``'s connection and server methods (idempotent)."""
    global _owner, _armed
    with _lock:
        if _installed:
            return
        mod = module if module is not None and hasattr(module, "Loop") else sys.modules.get(MODULE)
        owner = getattr(mod, "Loop", None) if mod is not None else None
        if not isinstance(owner, type):
            return
        _armed = _Armed()
        for name, make in _TARGETS:
            own = owner.__dict__.get(name, _MISSING)
            original = getattr(owner, name, None)
            if original is None:
                continue
            wrapper = make(original)
            try:
                functools.update_wrapper(wrapper, original)
            except Exception:
                pass
            wrapper.__connwatch_patch__ = True  # type: ignore[attr-defined]
            setattr(owner, name, wrapper)
            _installed[name] = (own, wrapper)
        _owner = owner


def unpatch() -> None:
    """Restore the exact originals (idempotent); an attribute re-wrapped by someone else after us
    is left alone, and our wrapper disarmed (it then just calls through)."""
    global _owner
    with _lock:
        owner = _owner
        _armed.on = False
        if owner is None:
            return
        # An attribute re-wrapped by someone else since is left alone (restore() says so).
        for name, (own, wrapper) in list(_installed.items()):
            restore(owner, name, wrapper, own)
        _installed.clear()
        _owner = None
        for (cls, name), (own, wrapper) in list(_classes.items()):
            restore(cls, name, wrapper, own)
        _classes.clear()
        _lost_hookable.clear()
