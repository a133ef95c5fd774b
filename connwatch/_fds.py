"""Open file descriptors and their limit: /proc fast path, psutil fallback."""

from __future__ import annotations

import os
import sys

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

_PROC_FD = "/proc/self/fd"
# Linux >= 6.2 reports the number of open fds as the st_size of /proc/self/fd (about 1 us at
# any count); older kernels report 0, and then we list the folder (or ask psutil).
_stat_size_works: Optional[bool] = None


def open_fds() -> Optional[int]:
    """Open file descriptors of this process, or None when the platform cannot tell."""
    global _stat_size_works
    try:
        if _stat_size_works is not False and os.path.isdir(_PROC_FD):
            size = os.stat(_PROC_FD).st_size
            if size > 0:
                _stat_size_works = True
                return int(size)
            _stat_size_works = False
        if os.path.isdir(_PROC_FD):
            # listdir holds one descriptor of its own while it reads.
            return max(0, len(os.listdir(_PROC_FD)) - 1)
    except OSError:
        pass
    try:
        import psutil

        proc = psutil.Process()
        if sys.platform == "win32":  # pragma: no cover
            return int(proc.num_handles())
        return int(proc.num_fds())
    except Exception:
        return None


def fd_limit() -> Optional[int]:
    """The soft RLIMIT_NOFILE, or None when unlimited or unknown."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - Windows
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    return int(soft)


def has_headroom(free: int) -> bool:
    """Whether at least ``free`` descriptors are left below the soft limit (True if unknown).

    The agent checks this before it calls into grpc: grpc's C core aborts the whole process
    when it cannot get a descriptor it needs (an eventfd or epoll set), so the agent's own
    exports are skipped while the app is that short of descriptors.
    """
    limit = fd_limit()
    if limit is None:
        return True
    used = open_fds()
    return used is None or limit - used >= free
