"""Patch for aiohttp: each ``aiohttp.ClientSession`` is one client, with its ``base_url``
host:port as upstream when it has one. Released once ``close()`` (also what ``async with``
calls) has run, or by garbage collection.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ._common import ACLOSE, INIT, Patcher, Target, arg, url_upstream

_TARGETS: Tuple[Target, ...] = (
    Target("aiohttp.client", "ClientSession", "__init__", INIT, "aiohttp.ClientSession"),
    Target("aiohttp.client", "ClientSession", "close", ACLOSE, "aiohttp.ClientSession"),
)


def _base_url(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    return url_upstream(arg(args, kwargs, 0, "base_url"))


_patcher = Patcher("aiohttp", _TARGETS, upstream={"aiohttp.ClientSession": _base_url})


is_patched, patch, unpatch = _patcher.functions()
