"""Call-site attribution: the first frame of the user's own code.

The walk starts a fixed number of frames above the wrapper, follows ``f_back`` and classifies
each frame's ``co_filename`` once (a dict lookup afterwards). It stops at the first user frame,
so its cost is the number of library frames between the constructor and the app, not the
stack depth. Each (file, line) gets one interned CallSite, whose traceback is captured the
first time it is seen and never again.
"""

from __future__ import annotations

import os
import sys
import threading

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType
    from typing import Callable, Dict, Optional, Tuple

    Frame = Tuple[str, int, str]  # (file, line, function)

USER = 0
STDLIB = 1  # stdlib, frozen modules, connwatch itself
THIRD_PARTY = 2  # site-packages / dist-packages
AGENT = 3  # connwatch's own exporters: what they create is never counted

OVERFLOW_FILE = "_other"


# slots=True where the Python version allows it (3.10+).
SLOTS: dict = {"slots": True} if sys.version_info >= (3, 10) else {}


class CallSite:
    """Where clients were created: the first user frame (file, line, function).

    Immutable and slotted (a hand-written class, not a dataclass: importing dataclasses costs
    milliseconds at interpreter start). Equality and hash ignore the traceback.
    """

    __slots__ = ("file", "function", "library", "line", "traceback")
    file: str
    line: int
    function: str
    library: bool
    traceback: Tuple[Frame, ...]

    def __init__(self, file: str, line: int, function: str, library: bool = False,
                 traceback: Tuple[Frame, ...] = ()) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "file", file)
        setattr_(self, "line", line)
        setattr_(self, "function", function)
        setattr_(self, "library", library)
        setattr_(self, "traceback", traceback)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CallSite is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"CallSite is immutable (cannot delete {name!r})")

    def _key(self) -> Tuple[str, int, str, bool]:
        return (self.file, self.line, self.function, self.library)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CallSite):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"CallSite(file={self.file!r}, line={self.line!r}, function={self.function!r}, "
                f"library={self.library!r})")

    def __reduce__(self) -> Tuple[object, Tuple[object, ...]]:
        return (CallSite, (self.file, self.line, self.function, self.library, self.traceback))

    def format(self) -> str:
        """``file:line (function)``, the form reports and errors use."""
        return f"{self.file}:{self.line} ({self.function})"

    def __str__(self) -> str:
        return self.format()


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


_STDLIB_DIRS = tuple(
    sorted(
        {
            _norm(os.path.dirname(os.__file__)) + os.sep,
            _norm(os.path.dirname(threading.__file__)) + os.sep,
        }
    )
)
_OWN_DIR = _norm(os.path.dirname(__file__)) + os.sep
_AGENT_DIR = _OWN_DIR + "exporters" + os.sep
_THREADING_FILE = threading.__file__
_NAME_ATTR = "co_qualname" if sys.version_info >= (3, 11) else "co_name"


class _State:
    """Module state, replaced whole by configure() so readers never see a half-update."""

    __slots__ = ("app_globs", "depth", "library_globs", "max_sites")

    def __init__(self, library_globs: Tuple[str, ...] = (), app_globs: Tuple[str, ...] = (),
                 depth: int = 16, max_sites: int = 10_000) -> None:
        self.library_globs = library_globs
        self.app_globs = app_globs
        self.depth = depth
        self.max_sites = max_sites


_state = _State()
# co_filename -> USER / STDLIB / THIRD_PARTY. Filled lazily; dict get/set are atomic under the GIL.
_kinds: Dict[str, int] = {}
# (co_filename, line) -> interned CallSite
_sites: Dict[Tuple[str, int], CallSite] = {}
_overflow = CallSite(OVERFLOW_FILE, 0, OVERFLOW_FILE, False, ())
# Threads the agent runs (exporters, and the SDK threads they start): a stack with no user
# frame on one of these threads is the agent's own work and is not counted.
_agent_threads: set = set()
# Code files of the agent (outside exporters/) whose frames mean "the agent's own work": a patch
# running library code whose sockets the patch accounts for itself (see mark_agent_code).
_agent_files: set = set()


def register_agent_thread(ident: Optional[int] = None) -> None:
    """Mark a thread (default: the current one) as the agent's own."""
    _agent_threads.add(threading.get_ident() if ident is None else ident)


def unregister_agent_thread(ident: Optional[int] = None) -> None:
    """Forget a thread registered with :func:`register_agent_thread`."""
    _agent_threads.discard(threading.get_ident() if ident is None else ident)


def mark_agent_code(filename: str) -> None:
    """Classify frames of ``filename`` (a connwatch module's ``co_filename``) as the agent's own:
    objects made while such a frame is the first non-library one on the stack are not counted."""
    _agent_files.add(filename)
    _kinds.pop(filename, None)
    if _clear_caches is not None:
        _clear_caches()


def configure(library_paths: Tuple[str, ...] = (), app_paths: Tuple[str, ...] = (),
              traceback_depth: int = 16, max_sites: int = 10_000) -> None:
    """Set the path overrides and traceback depth; clears the classification cache."""
    global _state
    _state = _State(tuple(library_paths), tuple(app_paths), traceback_depth, max_sites)
    _kinds.clear()
    _sites.clear()
    if _clear_caches is not None:
        _clear_caches()  # the C walk's caches in front of these dicts


def classify(filename: str) -> int:
    """USER, STDLIB or THIRD_PARTY for a code object's filename (cached)."""
    kind = _kinds.get(filename)
    if kind is None:
        kind = _classify(filename)
        _kinds[filename] = kind
    return kind


def _classify(filename: str) -> int:
    st = _state
    if filename in _agent_files:
        return AGENT
    if filename.startswith("<"):
        # "<frozen importlib._bootstrap>" is the import system; "<string>", "<stdin>" are user code.
        return STDLIB if filename.startswith("<frozen") else USER
    path = _norm(filename)
    if st.app_globs or st.library_globs:
        import fnmatch  # only when overrides are configured
    if st.app_globs and any(fnmatch.fnmatch(path, g) or fnmatch.fnmatch(filename, g) for g in st.app_globs):
        return USER
    if st.library_globs and any(
        fnmatch.fnmatch(path, g) or fnmatch.fnmatch(filename, g) for g in st.library_globs
    ):
        return THIRD_PARTY
    if path.startswith(_OWN_DIR):
        return AGENT if path.startswith(_AGENT_DIR) else STDLIB
    sep = os.sep
    if f"{sep}site-packages{sep}" in path or f"{sep}dist-packages{sep}" in path:
        return THIRD_PARTY
    if path.startswith(_STDLIB_DIRS):
        return STDLIB
    return USER


def find(depth: int = 2) -> Optional[CallSite]:
    """The call site of whoever called the code ``depth`` frames above this function.

    None when the object is the agent's own (an exporter frame on the stack, or an agent
    thread with no user frame): such objects are not tracked. (Replaced by the C version from
    ``connwatch._speedups`` when that is available: same walk, same caches.)
    """
    try:
        f: Optional[FrameType] = sys._getframe(depth)
    except ValueError:
        return _overflow
    kinds = _kinds
    while f is not None:
        fn = f.f_code.co_filename
        kind = kinds.get(fn)
        if kind is None:
            kind = classify(fn)
        if kind == USER:
            site = _sites.get((fn, f.f_lineno))
            return site if site is not None else _new_site(f, False)
        if kind == AGENT:
            return None
        f = f.f_back
    return _no_user_frame(sys._getframe(depth))


def _no_user_frame(start: FrameType) -> Optional[CallSite]:
    """The site when no frame from ``start`` outwards is the user's (a library's own thread,
    say): the outermost third-party frame, the library's entry point; with none, the outermost
    frame outside threading.py (the thread's target), since threading's bootstrap frames would
    name nothing. None on the agent's own threads."""
    if _agent_threads and threading.get_ident() in _agent_threads:
        return None
    outer: Optional[FrameType] = None
    outer_third: Optional[FrameType] = None
    f: Optional[FrameType] = start
    while f is not None:
        fn = f.f_code.co_filename
        if fn != _THREADING_FILE:
            outer = f
        if classify(fn) == THIRD_PARTY:
            outer_third = f
        f = f.f_back
    frame = outer_third or outer
    if frame is None:  # pragma: no cover - there is always a frame
        return _overflow
    return _library_site(frame)


def _new_site(frame: FrameType, library: bool) -> CallSite:
    code = frame.f_code
    key = (code.co_filename, frame.f_lineno)
    if len(_sites) >= _state.max_sites:
        return _overflow
    tb: list = []
    f: Optional[FrameType] = frame
    while f is not None and len(tb) < _state.depth:
        c = f.f_code
        tb.append((c.co_filename, f.f_lineno, getattr(c, _NAME_ATTR)))
        f = f.f_back
    site = CallSite(code.co_filename, key[1], getattr(code, _NAME_ATTR), library, tuple(tb))
    # setdefault: two threads meeting a new site at once agree on one object.
    return _sites.setdefault(key, site)


def library_site(frame: FrameType) -> Optional[CallSite]:
    """The interned site of ``frame``, marked as library (a library's own client).

    None when the object is the agent's own (an agent thread, or an exporter frame on the
    stack above ``frame``), exactly as :func:`find` decides.
    """
    if _agent_threads and threading.get_ident() in _agent_threads:
        return None
    f: Optional[FrameType] = frame
    while f is not None:
        if classify(f.f_code.co_filename) == AGENT:
            return None
        f = f.f_back
    return _library_site(frame)


def _library_site(frame: FrameType) -> CallSite:
    site = _sites.get((frame.f_code.co_filename, frame.f_lineno))
    return site if site is not None and site.library else _new_site(frame, True)


def overflow() -> CallSite:
    """The shared site used once the number of distinct sites reaches its bound."""
    return _overflow


_clear_caches: Optional[Callable[[], None]] = None


def _accelerate() -> None:
    global find, _clear_caches
    from . import _accel

    if _accel.speedups is not None:
        _accel.speedups.bind_callsite(_kinds, _sites, classify, _new_site, _no_user_frame, _overflow, USER, AGENT)
        find = _accel.speedups.find
        _clear_caches = _accel.speedups.clear_caches


_accelerate()
