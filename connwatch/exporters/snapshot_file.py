"""Per-process JSON snapshot files, written by a background thread and at exit.

The file is ``<dir>/<host>-<pid>.json``, written atomically (temp + rename), mode 0600, in a
folder created 0700 and refused when another user owns it. Writes never run on the app's
threads except the final one at exit; failures are logged (rate-limited) and skipped.
"""

from __future__ import annotations

import os
import stat
import sys
import threading

from .. import _log, _process, _registry, _threads

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

_RETRY_LOG_S = 300.0


def prepare_dir(path: str) -> Optional[str]:
    """Create ``path`` 0700 if needed and check it is ours; returns a reason when it is not usable."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        return f"cannot create it: {e.strerror or e}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it is owned by another user (uid {st.st_uid})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "it is not writable"
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass
    return None


def file_name(pid: Optional[int] = None) -> str:
    """``<host>-<pid>.json`` for this process (or ``pid``)."""
    return f"{_process.hostname()}-{os.getpid() if pid is None else pid}.json"


class SnapshotWriter:
    """Writes this process's snapshot file every ``interval`` seconds and at exit."""

    def __init__(self, folder: str, interval: float, retainers: bool = False) -> None:
        self.folder = folder
        self.interval = interval
        self.retainers = retainers  # CONNWATCH_RETAINERS: retainers of suspected leaks in each file
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()
        self._closed = False

    @property
    def path(self) -> str:
        """The file this process writes."""
        return os.path.join(self.folder, file_name())

    def start(self) -> None:
        """Start the background writer (a daemon thread); a no-op with interval 0."""
        self._pid = os.getpid()
        self._stop = threading.Event()
        leaks = sys.modules.get("connwatch._leaks")  # loaded with the first snapshot, not at start
        if leaks is not None:
            leaks.TRACKER.reset()  # growth windows start with this writer (and in a forked child)
        if self.interval <= 0:
            return
        t = threading.Thread(target=self._run, name="connwatch-snapshot", daemon=True)
        self._thread = t
        t.start()

    def _run(self) -> None:
        stop = self._stop
        me = self._thread
        try:
            while not stop.wait(self.interval):
                if self._pid != os.getpid():  # pragma: no cover - a forked copy of this thread's object
                    return
                self.write()
        finally:
            _threads.before_exit(me)  # threading patched by gevent since we started

    def write(self, final: bool = False) -> bool:
        """Write the snapshot file now; returns whether it was written. Never raises."""
        if self._pid != os.getpid() or self._closed:
            return False
        if not _registry.ever_tracked():
            # A process that never made a client (a build tool, a short script) leaves no
            # file, and pays nothing at exit: a whole environment may run with the agent on.
            return False
        try:
            from .. import _forksafe

            # First use loads json, dataclasses and the leak tracker, on the writer's thread
            # (or at exit), and only once a client exists; see _forksafe for the guard.
            with _forksafe.import_guard():
                from .. import _snapshot

            # One leak-window sample per write; with CONNWATCH_RETAINERS, the retainers of the
            # sites that are suspected leaks (a bounded search, on this thread).
            snap = _snapshot.take(final=final, sample=True, retainers="suspected" if self.retainers else False)
            path = self.path
            data = snap.dumps().encode("utf-8")
            # Checked at every write (a few syscalls): a folder removed while we run (a tmp
            # cleaner, an operator) is made again, 0700; one another user re-created in its
            # place is refused, so our file never lands in a folder they control.
            reason = prepare_dir(self.folder)
            if reason is not None:
                raise OSError(f"the folder is not usable: {reason}")
            _snapshot.write_atomic(path, data)
            return True
        except Exception as e:
            _log.warn_every(
                "snapshot-write", _RETRY_LOG_S,
                "cannot write the snapshot file in %s (%s); will retry", self.folder, e,
            )
            return False

    def stop(self, final_write: bool = True) -> None:
        """Stop the thread and write the final snapshot."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread() and t.is_alive():
            t.join(timeout=1.0)
        self._thread = None
        if final_write:
            self.write(final=True)
        self._closed = True

    def after_fork_child(self) -> None:
        """In a forked child: the parent's thread is gone; write our own file with our pid."""
        self._thread = None
        self._closed = False
        self.start()
