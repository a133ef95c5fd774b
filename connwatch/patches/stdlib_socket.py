"""Patch for the stdlib ``socket`` module: every Python-level socket is tracked.

This is the hot path (every socket of the process). Like the client patches (``_common``), it
replaces methods of the ``socket.socket`` class with plain functions, not wrapt proxies: two
wrapt FunctionWrappers cost ~1.15 us per socket, plain functions ~0.15 us. Patching the class
(not the module attribute) also covers code that did ``from socket import socket`` before the
agent started, subclasses such as ``ssl.SSLSocket``, and the sockets asyncio makes.

Roles: a socket starts with no role; ``connect``/``connect_ex`` make it a ``client`` (with its
upstream), ``listen`` a ``listener``; ``accept`` and ``socketpair`` make ``accepted`` and
``pair`` sockets. A socket built on the descriptor of another one that is then detached (how
``ssl`` wraps a socket) takes over that socket's record: one client, original call site.
"""

from __future__ import annotations

import errno
import functools
import socket
import threading
import weakref

from .. import _callsite, _limits, _log, _registry
from .._upstream import cache as _upstreams
from .._upstream import upstream_of
from . import _c

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Tuple

KIND = "socket"
_MISSING = object()
_S = socket.socket

# (owner, attribute name, wrapper factory name)
_TARGETS: Tuple[Tuple[Any, str], ...] = (
    (socket.socket, "__init__"),
    (socket.socket, "_real_close"),
    (socket.socket, "detach"),
    (socket.socket, "connect"),
    (socket.socket, "connect_ex"),
    (socket.socket, "listen"),
    (socket.socket, "accept"),
    (socket, "socketpair"),
)

_originals: Dict[Tuple[int, str], Any] = {}
_tls = threading.local()
_OK_CONNECT_EX = frozenset({0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EISCONN})

# Descriptors owned by an object counted on its own (a uvloop transport or listener, see
# uvloop_loop) -> a weak reference to that object. A socket built on one of them with no role
# hint is a view of it (uvloop's PseudoSocket methods build one per call, then detach it): not
# counted. Empty unless uvloop is patched; read only on the descriptor path below.
borrowed: Dict[int, Any] = {}
# Called before ``borrowed`` is read: a lender that looks its descriptors up only when a view
# could need them (uvloop_loop._lend_pending) adds them to ``borrowed`` then.
lenders: List[Callable[[], None]] = []

# The cap check before connect: reads the cap policy, returns a reservation or None, and
# raises ClientCapExceeded in raise mode. With no cap set it is skipped (one attribute read).
before_connect: Callable[[Any, Any], Any] = _limits.socket_connect_check


def _inspect(sock: socket.socket) -> Tuple[Optional[str], Optional[str]]:
    """Role and upstream of a socket built on an existing descriptor (fromfd, fileno=...)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_ACCEPTCONN", 30)):
            return "listener", None
    except OSError:
        pass
    try:
        peer = sock.getpeername()
    except OSError:
        return None, None
    if not peer and sock.family == getattr(socket, "AF_UNIX", -1):
        return "pair", None  # unnamed peer: a socketpair end
    return "client", upstream_of(peer)


def _make_wrappers(orig: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The wrappers around ``orig`` (name -> original; default: the stdlib's). gevent's socket
    class has the same methods and signatures, so its patch reuses these."""
    if orig is None:
        orig = {name: getattr(owner, name) for owner, name in _TARGETS}
    o_init = orig["__init__"]
    o_real_close = orig["_real_close"]
    o_detach = orig["detach"]
    o_connect = orig["connect"]
    o_connect_ex = orig["connect_ex"]
    o_listen = orig["listen"]
    o_accept = orig["accept"]
    o_socketpair = orig["socketpair"]
    # Bound here, not looked up as globals: close() may run during interpreter shutdown.
    track, release, set_role, transfer = _registry.track, _registry.release, _registry.set_role, _registry.transfer
    is_tracked = _registry.is_tracked
    find = _callsite.find
    owned = borrowed
    lenders_ = lenders
    tls = _tls
    internal_error = _log.internal_error

    def _after_fileno(self: socket.socket, site: Any) -> None:
        # A socket built on an existing descriptor (fromfd, accept, socketpair, ssl): its role.
        hint = getattr(tls, "hint", None)
        if hint is not None:
            role, upstream = hint
        else:
            for lend in lenders_:
                lend()
            if owned and self.fileno() in owned:
                return  # a view of a descriptor that is counted already
            role, upstream = _inspect(self)
            # Candidate for an ownership hand-over: if the socket that owns this descriptor
            # is detached next (ssl.SSLSocket._create does exactly that), we take its record.
            tls.adopt = (self.fileno(), weakref.ref(self))
        track(self, KIND, site, role, upstream)

    @functools.wraps(o_init)
    def _wrap___init__(self: socket.socket, family: Any = -1, type: Any = -1, proto: Any = -1,
                       fileno: Any = None) -> None:
        o_init(self, family, type, proto, fileno)
        try:
            site = find(2)
            if site is None:
                return  # the agent's own socket
            if fileno is None:
                track(self, KIND, site)
            else:
                _after_fileno(self, site)
        except Exception:
            internal_error("socket.__init__")

    @functools.wraps(o_real_close)
    def _wrap__real_close(self: socket.socket, _ss: Any = socket._socket.socket) -> None:  # type: ignore[attr-defined]
        try:
            o_real_close(self, _ss)
        finally:
            try:
                release(self)
            except Exception:
                internal_error("socket.close")

    @functools.wraps(o_detach)
    def _wrap_detach(self: socket.socket) -> int:
        fd = self.fileno()
        result: int = o_detach(self)
        try:
            adopt = getattr(tls, "adopt", None)
            if adopt is not None and adopt[0] == fd and fd >= 0:
                tls.adopt = None
                new = adopt[1]()
                if new is not None and new is not self and is_tracked(new) and new.fileno() == fd:
                    if transfer(self, new):
                        return result
            release(self)
        except Exception:
            internal_error("socket.detach")
        return result

    unreserve = _registry.unreserve

    def _connected(self: socket.socket, address: Any, res: Any) -> None:
        try:
            set_role(self, "client", upstream_of(address), res)
        except Exception:
            internal_error("socket.connect")

    limits = _limits
    upstreams = _upstreams

    @functools.wraps(o_connect)
    def _wrap_connect(self: socket.socket, address: Any) -> None:
        # may raise ClientCapExceeded, before the original: a refused client opens nothing
        res = before_connect(self, address) if limits._policy is not None else None
        try:
            o_connect(self, address)
        except (BlockingIOError, InterruptedError):
            _connected(self, address, res)  # non-blocking connect in progress: a client now
            raise
        except BaseException:
            if res is not None:
                unreserve(res)
            raise
        # _connected() inlined: this is every blocking connect of the process
        try:
            try:
                up = upstreams[address]
            except (KeyError, TypeError):
                up = upstream_of(address)
            set_role(self, "client", up, res)
        except Exception:
            internal_error("socket.connect")

    @functools.wraps(o_connect_ex)
    def _wrap_connect_ex(self: socket.socket, address: Any) -> int:
        res = before_connect(self, address) if limits._policy is not None else None
        try:
            code: int = o_connect_ex(self, address)
        except BaseException:
            if res is not None:
                unreserve(res)
            raise
        if code in _OK_CONNECT_EX:
            _connected(self, address, res)
        elif res is not None:
            unreserve(res)
        return code

    @functools.wraps(o_listen)
    def _wrap_listen(self: socket.socket, *args: Any) -> None:
        o_listen(self, *args)
        try:
            set_role(self, "listener", None)
        except Exception:
            internal_error("socket.listen")

    @functools.wraps(o_accept)
    def _wrap_accept(self: socket.socket) -> Any:
        tls.hint = ("accepted", None)
        try:
            return o_accept(self)
        finally:
            tls.hint = None

    @functools.wraps(o_socketpair)
    def _wrap_socketpair(*args: Any, **kwargs: Any) -> Any:
        tls.hint = ("pair", None)
        try:
            return o_socketpair(*args, **kwargs)
        finally:
            tls.hint = None

    wrappers: Dict[str, Any] = {
        "__init__": _wrap___init__, "_real_close": _wrap__real_close, "detach": _wrap_detach,
        "connect": _wrap_connect, "connect_ex": _wrap_connect_ex, "listen": _wrap_listen,
        "accept": _wrap_accept, "socketpair": _wrap_socketpair,
    }
    c = _c.C
    if c is not None:
        # The three that run for every client socket, in C (same behaviour, no Python frame).
        for name, action, where, extra in (
            ("__init__", _c.W_SOCK_INIT, "socket.__init__", _after_fileno),
            ("_real_close", _c.W_SOCK_CLOSE, "socket.close", None),
            ("connect", _c.W_SOCK_CONNECT, "socket.connect", (upstreams, upstream_of, _connected)),
        ):
            original = orig[name]
            wrapper = c.wrapper(action, original, KIND, None, None, None, where, extra)
            wrappers[name] = functools.wraps(original)(wrapper)
    return wrappers


def is_patched() -> bool:
    """Whether the socket patch is installed."""
    return bool(_originals)


def patch(module: Any = socket) -> None:
    """Install the socket wrappers (idempotent)."""
    if _originals:
        return
    wrappers = _make_wrappers()
    for owner, name in _TARGETS:
        # Remember what the owner itself had (connect is inherited from _socket.socket).
        own = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name)
        _originals[(id(owner), name)] = own
    for owner, name in _TARGETS:
        setattr(owner, name, wrappers[name])
        wrappers[name].__connwatch_patch__ = True


def unpatch() -> None:
    """Restore the exact originals (idempotent)."""
    if not _originals:
        return
    for owner, name in _TARGETS:
        original = _originals.get((id(owner), name), _MISSING)
        current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if not getattr(current, "__connwatch_patch__", False):
            continue  # replaced since we patched (gevent's patch_all, say): leave theirs alone
        if original is _MISSING:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, original)
    _originals.clear()
