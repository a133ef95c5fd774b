"""The agent's own threads versus a ``threading`` monkey-patched after they started (stdlib only).

The agent starts its threads at interpreter start-up (the ``.pth`` hook), before the app runs
``gevent.monkey.patch_all()``. That replaces ``threading.get_ident`` with a greenlet id, and
when one of our threads ends (at exit), ``Thread._delete`` looks itself up in
``threading._active`` under that new id: ``KeyError``, printed as "Exception ignored in thread
started by ...". :func:`before_exit`, called last in each agent thread, files the thread under
the id ``_delete`` will ask for. It changes nothing when ``get_ident`` is the real one.
"""

from __future__ import annotations

import threading


def before_exit(thread: threading.Thread | None) -> None:
    """Let ``threading`` forget ``thread`` (the calling thread) when it ends; never raises."""
    try:
        if thread is None:
            return
        real = thread.ident
        now = threading.get_ident()
        if real is None or now == real:
            return
        active = threading._active  # type: ignore[attr-defined]
        with threading._active_limbo_lock:  # type: ignore[attr-defined]
            if active.get(real) is thread and now not in active:
                active[now] = active.pop(real)
    except Exception:  # pragma: no cover - a threading module we do not know
        pass
