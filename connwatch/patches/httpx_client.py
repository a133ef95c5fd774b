"""Patch for httpx: each ``httpx.Client``/``httpx.AsyncClient`` is one client, with its
``base_url`` host:port as upstream when it has one. ``httpx.get()`` and friends use a
temporary Client closed on return. Released by ``close()``/``aclose()``, by leaving the
``with``/``async with`` block (which does not call close) or by garbage collection.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ._common import ACLOSE, CLOSE, INIT, Patcher, Target, url_upstream

_TARGETS: Tuple[Target, ...] = (
    Target("httpx._client", "Client", "__init__", INIT, "httpx.Client"),
    Target("httpx._client", "Client", "close", CLOSE, "httpx.Client"),
    Target("httpx._client", "Client", "__exit__", CLOSE, "httpx.Client"),
    Target("httpx._client", "AsyncClient", "__init__", INIT, "httpx.AsyncClient"),
    Target("httpx._client", "AsyncClient", "aclose", ACLOSE, "httpx.AsyncClient"),
    Target("httpx._client", "AsyncClient", "__aexit__", ACLOSE, "httpx.AsyncClient"),
)


def _base_url(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    return url_upstream(kwargs.get("base_url") or None)  # keyword-only in httpx


_patcher = Patcher("httpx", _TARGETS, upstream={"httpx.Client": _base_url, "httpx.AsyncClient": _base_url})


is_patched, patch, unpatch = _patcher.functions()
