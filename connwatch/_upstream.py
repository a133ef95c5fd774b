"""Socket addresses as upstreams: ``host:port``, ``[v6]:port``, ``unix:/path`` (no credentials).

Below both the cap policy (``_limits``) and the socket patch, which both name the upstream of
an address. Stdlib only: part of the core.
"""

from __future__ import annotations

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

__all__ = ["cache", "upstream_of"]

cache: Dict[Any, Optional[str]] = {}  # address -> upstream; bounded, see upstream_of


def upstream_of(address: Any) -> Optional[str]:
    """``host:port`` (``[v6]:port``, ``unix:/path``) for a socket address; no credentials.

    Cached per address (formatting costs more than the lookup on the connect path).
    """
    try:
        up = cache.get(address)
    except TypeError:  # an unhashable address: format it every time
        return _format(address)
    if up is None:
        up = _format(address)
        if len(cache) >= 4096:
            cache.clear()
        cache[address] = up
    return up


def _format(address: Any) -> Optional[str]:
    try:
        if isinstance(address, tuple) and len(address) >= 2:
            host = address[0]
            if isinstance(host, bytes):
                host = host.decode("ascii", "replace")
            host = str(host)
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            return f"{host}:{int(address[1])}"
        if isinstance(address, (str, bytes)):
            path = address.decode("utf-8", "replace") if isinstance(address, bytes) else address
            if path.startswith("\0"):
                path = "@" + path[1:]
            return "unix:" + path if path else None
    except Exception:
        return None
    return None
