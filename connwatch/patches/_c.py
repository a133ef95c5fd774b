"""The C versions of the patch wrappers (``connwatch._speedups.wrapper``), or None.

A C wrapper behaves as the Python function it replaces (``_common._make_init`` and friends,
``stdlib_socket``'s ``__init__``/``_real_close``/``connect``) but runs without a Python frame
of its own, and calls the C registry directly: a ``requests.get()`` passes through about nine
wrappers, every socket through two or three. None on the pure-Python path (no compiler, or
``CONNWATCH_PURE_PYTHON=1``), where the Python functions run.
"""

from __future__ import annotations

from .. import _accel, _callsite, _limits, _registry

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

C: Any = _accel.speedups if _registry.ACCELERATED else None
# What a C wrapper does (the first argument of C.wrapper).
W_INIT, W_CLOSE, W_NEST, W_SOCK_INIT, W_SOCK_CLOSE, W_SOCK_CONNECT = range(6)

if C is not None:
    C.bind_patches(vars(_limits), _limits.guarded_check, _callsite.library_site, _limits.socket_connect_check)
