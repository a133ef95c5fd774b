"""Frames the uvloop patch owns inside uvloop's own calls (classified as the agent's).

uvloop makes Python sockets of its own in two places: ``create_server`` and
``create_unix_server`` build the listening socket in Python, then hand its descriptor to libuv
(the patch counts the listener itself), and every ``PseudoSocket`` method the patch needs
(``get_extra_info('peername')``) builds a throwaway socket on the transport's descriptor. While
a function of this module is the first frame above such a socket, the socket patch's walk meets
an agent frame and does not count it. Nothing here runs the app's code: protocol factories are
called under the patch's other module, whose frames are ordinary library frames.
"""

from __future__ import annotations

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Tuple


async def call(original: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """Await ``original(*args, **kwargs)`` (uvloop's create_server / create_unix_server)."""
    return await original(*args, **kwargs)


def extra_info(transport: Any, name: str) -> Any:
    """``transport.get_extra_info(name)``."""
    return transport.get_extra_info(name)


def listener_fds(server: Any) -> List[int]:
    """The descriptors of a uvloop ``Server``'s listening sockets."""
    return [int(s.fileno()) for s in server.sockets or ()]
