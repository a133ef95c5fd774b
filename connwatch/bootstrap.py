"""Start and stop the agent: config -> call-site rules -> patches -> snapshot writer -> fork hooks.

Nothing here raises into the app: a failure to start is logged once and leaves the app alone.
``auto_start()`` is what the ``.pth`` hook and ``sitecustomize`` call.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from . import _callsite, _config, _forksafe, _limits, _log, _process, _registry
from ._config import Config

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

_lock = threading.RLock()


class _State:
    enabled = False
    config: Optional[Config] = None
    writer: Any = None
    atexit_registered = False
    fork_registered = False


def is_enabled() -> bool:
    """Whether the agent is running in this process."""
    return _State.enabled


def config() -> Optional[Config]:
    """The running agent's settings (None when not enabled)."""
    return _State.config


def start(**overrides: object) -> bool:
    """Start the agent with settings from the environment and ``overrides``; never raises.

    Returns whether the agent is running. A second call while running changes nothing.
    """
    with _lock:
        if _State.enabled:
            return True
        try:
            _start(overrides)
            return True
        except Exception:
            _log.internal_error("start-up")
            try:
                _stop(final_write=False)
            except Exception:
                pass
            return False


def _start(overrides: dict[str, object]) -> None:
    cfg = _config.load(None, overrides)
    _State.config = cfg
    _callsite.configure(cfg.library_paths, cfg.app_paths, cfg.traceback_depth)
    _process.set_process(service=cfg.service, started=time.time())
    _limits.configure(cfg.cap, cfg.cap_per_callsite, cfg.cap_per_upstream, cfg.cap_mode)
    _process.set_cap_info(_limits.describe)
    from . import patches

    patches.install(cfg.disabled_patches)
    from . import _mp

    _mp.install(_at_exit)  # multiprocessing children end with os._exit: a final write anyway
    _State.writer = _make_writer(cfg)
    if _State.writer is not None:
        _State.writer.start()
    # Metric exporters and span events; heavy imports happen off this thread, and with
    # nothing configured this returns at once.
    from . import exporters

    if any(name in ("otlp", "console") for name in cfg.exporters):
        # The exporter thread imports grpc, which imports concurrent.futures.thread: a module
        # that registers a before/after_in_parent pair of fork hooks. Registered by another
        # thread while this one is inside os.fork(), only the parent half runs, and os.fork()
        # prints "release unlocked lock" in the app. Imported here (~1.5 ms), it is in place
        # before the exporter thread exists.
        import concurrent.futures.thread  # noqa: F401

    exporters.start(cfg)
    if not _State.fork_registered:
        # logging's own at-fork hook must run before ours in a child (hooks run in the order
        # registered): ours start threads, and a thread that logs before logging has
        # re-created its locks could block forever on a lock inherited in a held state.
        import logging  # noqa: F401

        _forksafe.register(before=_registry._before_fork, parent=_registry._after_fork_parent,
                           child=_after_fork_child)
        _State.fork_registered = True
    if not _State.atexit_registered:
        atexit.register(_at_exit)
        _State.atexit_registered = True
    _State.enabled = True


def _make_writer(cfg: Config) -> Any:
    from .exporters.snapshot_file import SnapshotWriter, prepare_dir

    folder = cfg.dir
    reason = prepare_dir(folder)
    if reason is not None:
        fallback = _config.default_dir()
        _log.warn_once(
            "dir", "snapshot folder %s is not usable (%s); using %s instead", folder, reason,
            fallback if fallback != folder else "no folder",
        )
        if fallback == folder or prepare_dir(fallback) is not None:
            _log.warn_once("dir-fallback", "no usable snapshot folder; snapshot files are off")
            return None
        folder = fallback
    return SnapshotWriter(folder, cfg.snapshot_interval, retainers=cfg.retainers)


def stop(final_write: bool = True) -> None:
    """Stop the agent: restore every patched original, write a final snapshot (unless
    ``final_write`` is False), forget counts."""
    with _lock:
        if not _State.enabled:
            return
        try:
            _stop(final_write=final_write)
        except Exception:
            _log.internal_error("stop")


def _stop(final_write: bool) -> None:
    from . import patches

    patches.uninstall()
    from . import _mp

    _mp.uninstall()
    _limits.configure()
    _limits.reset()
    writer, _State.writer = _State.writer, None
    if writer is not None:
        writer.stop(final_write=final_write)
    from . import exporters

    exporters.stop()
    _State.enabled = False
    _registry.clear()


def _at_exit() -> None:
    try:
        writer = _State.writer
        if _State.enabled and writer is not None:
            writer.stop(final_write=True)
        if _State.enabled:
            from . import exporters

            exporters.stop()
    except Exception:
        pass


def _after_fork_child() -> None:
    _registry._after_fork_child()
    _process.after_fork_child()
    snapshot_module = sys.modules.get("connwatch._snapshot")
    if snapshot_module is not None:
        snapshot_module._after_fork_child()
    global _lock
    _lock = threading.RLock()
    writer = _State.writer
    if _State.enabled and writer is not None:
        writer.after_fork_child()
    if _State.enabled:
        from . import exporters

        exporters.after_fork_child()


def snapshot_path() -> Optional[str]:
    """The snapshot file this process writes, or None when files are off."""
    writer = _State.writer
    return writer.path if writer is not None else None


def auto_start() -> None:
    """Start the agent when CONNWATCH_ENABLED asks for it (the .pth hook and sitecustomize)."""
    try:
        if _config.env_enabled() and not _State.enabled:
            start()
    except Exception:  # pragma: no cover - start() already swallows
        pass


def chain_sitecustomize(this_file: str) -> None:
    """Run the ``sitecustomize`` that ``this_file`` shadows on ``sys.path``, if there is one."""
    import importlib.machinery
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(this_file))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
        if spec is None or spec.loader is None:
            return
        if spec.origin and os.path.abspath(spec.origin) == os.path.abspath(this_file):
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["_connwatch_chained_sitecustomize"] = module
        spec.loader.exec_module(module)
    except Exception:
        _log.internal_error("chained sitecustomize")
