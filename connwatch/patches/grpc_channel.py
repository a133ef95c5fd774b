"""Patch for grpc: every sync and ``grpc.aio`` channel is one client; upstream is its target.

grpc's C core opens (and shares) its own TCP connections, invisible to the socket patch, so
the channel is the unit. The channel *classes* are wrapped, not the module functions: that
covers ``insecure_channel``, ``secure_channel``, direct construction, and functions a library
bound before the agent started. ``intercept_channel`` wraps an existing channel in another
class, so it is never counted twice. A channel is released by ``close()``, by leaving its
``with``/``async with`` block, or by garbage collection.

``grpc._channel`` is imported lazily (inside ``insecure_channel``), so the ``grpc`` hook
registers hooks of its own for the two channel modules; each is patched once it is imported.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, Optional, Tuple

from .. import _importhook
from ._common import ACLOSE, CLOSE, INIT, Patcher, Target, arg, host_port

SYNC = "grpc._channel"
AIO = "grpc.aio._channel"

_TARGETS: Tuple[Target, ...] = (
    Target(SYNC, "Channel", "__init__", INIT, "grpc.Channel"),
    Target(SYNC, "Channel", "close", CLOSE, "grpc.Channel"),
    Target(SYNC, "Channel", "__exit__", CLOSE, "grpc.Channel"),
    Target(AIO, "Channel", "__init__", INIT, "grpc.aio.Channel"),
    Target(AIO, "Channel", "close", ACLOSE, "grpc.aio.Channel"),
    Target(AIO, "Channel", "__aexit__", ACLOSE, "grpc.aio.Channel"),
)


_NAME_SCHEMES = frozenset({"dns", "xds", "google-c2p"})


def target_upstream(target: Any) -> Optional[str]:
    """``host:port`` for a grpc target string, without scheme, authority, credentials or query.

    ``dns:///h:p`` and ``dns://auth/h:p`` -> ``h:p``; ``ipv4:1.2.3.4:p[,...]`` -> the first
    address; ``ipv6:[::1]:p`` -> ``[::1]:p``; ``unix:/path`` -> ``unix:/path``; a bare host
    gets grpc's default port 443.
    """
    if isinstance(target, bytes):
        target = target.decode("utf-8", "replace")
    if not isinstance(target, str) or not target:
        return None
    t = target.split("?", 1)[0]
    scheme, sep, rest = t.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme == "unix-abstract":
        return "unix:@" + rest
    if scheme == "unix":
        return "unix:" + ("/" + rest.lstrip("/") if rest.startswith("/") else rest)
    if scheme in ("ipv4", "ipv6"):
        t = rest.split(",", 1)[0]
    elif "://" in t:
        t = t.split("://", 1)[1]
        t = t.split("/", 1)[1] if "/" in t else t  # drop the authority (a DNS server)
    elif scheme in _NAME_SCHEMES:
        t = rest
    t = t.rpartition("@")[2].strip("/")
    if t.startswith("["):
        host, _, tail = t[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    elif t.count(":") == 1:
        host, _, port = t.partition(":")
    else:
        host, port = t, ""  # no port, or a bare IPv6 address
    if not host:
        return None
    return host_port(host, int(port) if port.isdigit() else 443)


_targets: Dict[Any, Optional[str]] = {}  # target -> upstream; bounded (cleared at 1,024)


def _target(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    target = arg(args, kwargs, 0, "target")
    try:
        return _targets[target]  # parsing costs ~1 us; apps reuse a few targets
    except (KeyError, TypeError):
        pass
    up = target_upstream(target)
    if isinstance(target, (str, bytes)):
        if len(_targets) >= 1024:
            _targets.clear()
        _targets[target] = up
    return up


_patcher = Patcher(
    "grpc", _TARGETS, upstream={"grpc.Channel": _target, "grpc.aio.Channel": _target},
    upstream_cache={"grpc.Channel": (0, "target", _targets), "grpc.aio.Channel": (0, "target", _targets)},
)


def _wrap_channel_module(module: ModuleType) -> None:
    _patcher.patch((module.__name__,))


def is_patched() -> bool:
    """Whether any grpc channel class is wrapped (or waiting for its module)."""
    return _patcher.is_patched()


def patch(module: Any = None) -> None:
    """Wrap the channel classes now, or when ``grpc._channel``/``grpc.aio._channel`` load."""
    for name in (SYNC, AIO):
        _importhook.when_imported(name, _wrap_channel_module)


def unpatch() -> None:
    """Drop the channel-module hooks and restore the exact originals (idempotent)."""
    for name in (SYNC, AIO):
        _importhook.discard(name, _wrap_channel_module)
    _patcher.unpatch()
