"""Retainers: why a live client is still alive, as paths from a root a person recognises.

A path starts at a module global (``app.cache.CLIENTS``), a class attribute
(``app.pool.Registry.clients``) or a local variable of a thread's running frame
(``thread 'worker' frame serve() local conn``), and goes through containers and objects
(dict keys, list/tuple indices, set members, attributes, closure cells, frame locals of
generators and coroutines) to one live client:
``app.cache.CLIENTS (dict) ['a'] -> (list) [3]``.

The search is breadth-first from every root at once (so each path is a shortest one), over
``gc.get_referents`` (what the garbage collector itself follows), towards the ids of a few live
clients per call site. It goes a level at a time, in batches whose filtering (tracked objects,
not seen before, targets among them) runs in C, and keeps no parent pointers: the holder of a
target is found afterwards by scanning the level above (in C again), and edge names are worked
out only for the edges of the paths found.

Hazards, and how this module meets them:

* **Only on demand.** Nothing here runs on the hot path: ``connwatch.snapshot(retainers=True)``,
  a leak error (``guard()``, the pytest plugin), or ``CONNWATCH_RETAINERS`` for the sites of a
  periodic snapshot that are suspected leaks.
* **Bounded.** At most ``max_objects`` distinct objects are reached and at most ``max_ms`` are
  spent; when a bound stops the search, the result says so (``truncated``, ``limit``).
* **No references left behind.** The search holds the objects it reached (so ids stay unique
  while it runs) in its own locals and drops them when it returns; the caller drops its targets.
  The frame walks drop every frame reference before returning: a frame object held by a local
  of its own frame is a cycle that would keep the frames below it, and their locals, alive.
* **Not itself.** Its own frames and containers, connwatch's modules (the registry and its weak
  references among them) and ``weakref.finalize``'s registry (callback arguments, e.g. urllib3's
  pool queues) are never followed, so no path runs through connwatch or a finalizer.
* **Memory.** A big container is expanded a slice of members at a time, so no single batch
  makes a list of millions of references; the objects bound is exact.
* **Never raises.** Errors are logged once and end the search with what was found.
* **Frame locals.** A running frame's locals are read with ``frame.f_locals``. On Python 3.12
  and older that fills a dict cached in the frame (CPython's own behaviour, PEP 667): a local the
  function deletes later stays referenced by that cache until the function returns or its
  locals are read again.

Stdlib only: this is part of the core.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import types
from collections import OrderedDict, defaultdict, deque
from itertools import islice
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from . import _log, _registry

if TYPE_CHECKING:
    from ._snapshot import Statistic

MAX_OBJECTS = 200_000  # distinct objects reached, at most
MAX_MS = 500.0  # milliseconds, at most
MAX_PATHS = 3  # paths per call site
MAX_TARGETS = 8  # live clients per call site searched for
MAX_EDGES = 24  # a longer path keeps its first and last edges
_KEY_CHARS = 40

Key = Tuple[str, Optional[str], int]  # (kind, role, id(site)), as the registry keys its stats
Group = Tuple[str, Optional[str], Any, Sequence[object]]  # (kind, role, site, live objects)
# Where a root was found: ("module", name, its namespace) or ("frame", thread, function, [(local, value)])
Origin = Tuple[Any, ...]

_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CO_OPTIMIZED = 0x0001
_ATOMIC = frozenset({
    str, bytes, bytearray, int, float, complex, bool, type(None), type(Ellipsis), type(NotImplemented),
    range, slice, memoryview, types.CodeType,
})
_GENERATORS = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)
_FUNCTION = types.FunctionType
_MODULE = types.ModuleType
_FRAME = types.FrameType
_CHUNK = 2048  # objects expanded per gc.get_referents call (and between two looks at the clock)
_EXTRA_LEVELS = 1  # once every target is found, this many more levels for second paths
_EXTRA_OBJECTS = 10_000  # ... and at least this many more objects
_is_tracked = gc.is_tracked
_BIG = 8192  # a container with more members than this is expanded a slice at a time
_CONTAINERS = frozenset({dict, list, tuple, set, frozenset, deque, OrderedDict, defaultdict})


def key_of(kind: str, role: Optional[str], site: Any) -> Key:
    """The key results are filed under: the registry's (kind, role, id(site))."""
    return (kind, role, id(site))


def search(groups: Iterable[Group], max_objects: int = MAX_OBJECTS, max_ms: float = MAX_MS,
           max_paths: int = MAX_PATHS) -> Tuple[Dict[Key, List[str]], Dict[str, Any]]:
    """Paths from recognisable roots to the objects of each group, and what the search cost.

    Returns ``({key: [path, ...]}, info)``: every group gets a key (an empty list when no path
    was found) and ``info`` is ``{"visited", "elapsed_ms", "truncated", "limit", "max_objects",
    "max_ms", "targets", "found"}``. Never raises.
    """
    start = time.perf_counter()
    paths: Dict[Key, List[str]] = {}
    info: Dict[str, Any] = {"visited": 0, "elapsed_ms": 0.0, "truncated": False, "limit": None,
                            "max_objects": int(max_objects), "max_ms": float(max_ms), "targets": 0, "found": 0}
    try:
        _run(groups, max(1, int(max_objects)), max(0.0, float(max_ms)), max(1, int(max_paths)),
             start, paths, info)
    except Exception:
        _log.internal_error("the retainer search")
        info["truncated"] = True
        info["limit"] = "error"
    info["elapsed_ms"] = round((time.perf_counter() - start) * 1000.0, 2)
    return paths, info


def for_live(keys: Optional[Iterable[Key]] = None, newest: bool = False, max_per_site: int = MAX_TARGETS,
             max_objects: int = MAX_OBJECTS, max_ms: float = MAX_MS,
             max_paths: int = MAX_PATHS) -> Tuple[Dict[Key, List[str]], Dict[str, Any]]:
    """Retainers of the live clients of every call site (or of the sites ``keys`` names).

    ``newest`` searches for the most recent clients of each site (those a block just left)
    rather than the oldest.
    """
    wanted = None if keys is None else set(keys)
    try:
        groups = [g for g in _registry.live_objects(max_per_site, newest)
                  if wanted is None or key_of(g[0], g[1], g[2]) in wanted]
    except Exception:
        _log.internal_error("the retainer search")
        groups = []
    try:
        return search(groups, max_objects, max_ms, max_paths)
    finally:
        del groups  # the only strong references to the clients: gone with this call


def attach(stats: List[Statistic], suspected_only: bool = False, max_objects: int = MAX_OBJECTS,
           max_ms: float = MAX_MS, max_paths: int = MAX_PATHS,
           ) -> Tuple[List[Statistic], Optional[Dict[str, Any]]]:
    """``stats`` with ``retainers`` filled in for each call site with live clients (only the
    suspected leaks with ``suspected_only``), and the search's cost; None when nothing was asked."""
    from dataclasses import replace

    def wanted(s: Statistic) -> bool:
        if not s.live or s.site is None:
            return False
        return not suspected_only or (s.growth is not None and s.growth.suspected)

    keys = {key_of(s.kind, s.role, s.site) for s in stats if wanted(s)}
    if suspected_only and not keys:
        return stats, None
    found, info = for_live(keys, max_objects=max_objects, max_ms=max_ms, max_paths=max_paths)
    out = [replace(s, retainers=tuple(found.get(key_of(s.kind, s.role, s.site), ())))
           if key_of(s.kind, s.role, s.site) in keys else s for s in stats]
    return out, info


# --- the search ------------------------------------------------------------------------------

def _run(groups: Iterable[Group], max_objects: int, max_ms: float, max_paths: int, start: float,
         paths: Dict[Key, List[str]], info: Dict[str, Any]) -> None:
    want: Dict[int, Key] = {}  # id of a target -> its group's key
    keep: Dict[int, object] = {}  # id of a target -> the target
    for kind, role, site, objs in groups:
        key = key_of(kind, role, site)
        paths.setdefault(key, [])
        for o in objs:
            if id(o) not in want:
                want[id(o)] = key
                keep[id(o)] = o
    info["targets"] = len(want)
    if not want:
        return
    targets = set(want)
    remaining = set(want)
    signatures: Dict[Key, Set[str]] = {}
    deadline = start + max_ms / 1000.0
    # The objects first reached at each depth (0: the roots). Holding them keeps every id we
    # saw unique until we return (an object freed meanwhile could not lend its id to another).
    levels: List[List[object]] = []
    root_origin: Dict[int, Origin] = {}  # id of a root -> where it was found (its label, made if needed)
    seen: Set[int] = _skip_ids()
    seen.update(map(id, (keep, levels, root_origin, want, targets, remaining, paths, signatures, info, groups)))
    base = len(seen)
    # Once every target is found, a little more for second paths (a client in a global list
    # and in a frame local): the rest of that level and _EXTRA_LEVELS more, and at most half as
    # much work again as it took (at least _EXTRA_OBJECTS objects).
    done_at: List[Any] = [None, max_objects]  # [the depth where the last target was found, objects cap]

    def all_found(depth: int) -> None:
        if done_at[0] is None and not remaining:
            n = len(seen) - base
            done_at[0], done_at[1] = depth, min(max_objects, n + max(n // 2, _EXTRA_OBJECTS))

    def more(depth: int) -> bool:
        if remaining:
            return True
        return (done_at[0] is not None and depth <= done_at[0] + _EXTRA_LEVELS
                and len(seen) - base < done_at[1] and _want_more(paths, max_paths))

    def add_path(key: Key, text: str) -> None:
        sigs = signatures.setdefault(key, set())
        sig = _signature(text)
        if sig not in sigs and len(paths[key]) < max_paths:
            sigs.add(sig)
            paths[key].append(text)

    def record(i: int, depth: int, chunk: Sequence[object], first: bool) -> None:
        """Target ``i`` is held by an object of ``chunk`` (at ``depth``): file the path."""
        key = want[i]
        if first:
            remaining.discard(i)
            info["found"] += 1
        if len(paths[key]) >= max_paths:
            return
        chain = [keep[i]]
        holder = _holder(chunk, i)
        d = depth
        while holder is not None:
            chain.append(holder)
            if d == 0:
                break
            d -= 1
            holder = _holder(levels[d], id(holder))
        if holder is None:
            return  # the heap changed under us (another thread): no path for this one
        chain.reverse()
        origin = root_origin.get(id(chain[0]))
        add_path(key, _render(_root_label(origin, chain[0]) if origin is not None else "?", chain))

    def stop(limit: str) -> None:
        info["truncated"], info["limit"] = True, limit

    # Depth 0: every root at once (breadth-first from all of them: each path is a shortest one),
    # a module namespace or a frame's locals at a time, in C like the levels below.
    level: List[object] = []
    for origin, values in _roots(seen):
        tracked = list(filter(_is_tracked, values))
        byid = dict(zip(map(id, tracked), tracked))
        new = _within(set(byid).difference(seen), max_objects - (len(seen) - base))
        if new:
            seen.update(new)
            level.extend(map(byid.__getitem__, new))
            root_origin.update(dict.fromkeys(new, origin))
        for i in ([t for t in targets if t in byid] if len(targets) < len(byid) else targets.intersection(byid)):
            if i in remaining:
                remaining.discard(i)
                info["found"] += 1
            add_path(want[i], _root_label(origin, byid[i]))  # (a second root holding it: a second path)
        del tracked, byid
        if len(seen) - base >= max_objects:
            stop("objects")
            break
        if time.perf_counter() >= deadline:
            stop("time")
            break
    levels.append(level)
    all_found(-1)

    depth = 0
    while level and not info["truncated"] and more(depth):
        nxt: List[object] = []
        # All of it in C (a few calls per batch, no Python code per object): what the collector
        # follows from a batch of objects; those that can hold something (tracked: not strings,
        # numbers, or containers of them); those not reached before.
        for chunk, refs in _batches(level):
            tracked = list(filter(_is_tracked, refs))  # (clients are instances: always tracked)
            del refs
            byid = dict(zip(map(id, tracked), tracked))
            hits = [t for t in targets if t in byid] if len(targets) < len(byid) else targets.intersection(byid)
            # (set.difference walks the smaller side here; ``keys() - seen`` would walk ``seen``.)
            new = _within(set(byid).difference(seen), max_objects - (len(seen) - base))
            if new:
                objs = list(map(byid.__getitem__, new))
                seen.update(new)
                nxt.extend(objs)
            for i in hits:
                if i in remaining:  # (reached for the first time: it is in ``new``)
                    record(i, depth, chunk, True)
                elif len(paths[want[i]]) < max_paths:
                    record(i, depth, chunk, False)  # a second holder of a target found before
            all_found(depth)
            del tracked, byid
            if len(seen) - base >= max_objects:
                stop("objects")
                break
            if time.perf_counter() >= deadline:
                stop("time")
                break
            if not more(depth):
                break
        levels.append(nxt)
        level = nxt
        depth += 1
    info["visited"] = len(seen) - base
    # Drop everything reached now, not when this frame goes.
    levels.clear()
    keep.clear()


def _within(new: Set[int], room: int) -> Set[int]:
    """``new``, cut to ``room`` ids (the objects bound is exact)."""
    if len(new) <= room:
        return new
    return set(islice(new, max(0, room)))


def _want_more(paths: Dict[Key, List[str]], max_paths: int) -> bool:
    return any(len(v) < max_paths for v in paths.values())


def _bigs(objs: List[object]) -> List[Any]:
    """The big containers among ``objs`` (a C-level look at their types first)."""
    if _CONTAINERS.isdisjoint(map(type, objs)):
        return []
    containers = _CONTAINERS
    return [o for o in objs if type(o) in containers and len(o) > _BIG]  # type: ignore[arg-type]


def _batches(level: List[object]) -> Iterator[Tuple[List[object], List[object]]]:
    """(holders, what they refer to) for a level, a chunk at a time; a big container on its
    own, a slice of its members at a time (a million-entry dict would otherwise be one list of
    two million references, made in one call the clock cannot interrupt)."""
    for c0 in range(0, len(level), _CHUNK):
        chunk = level[c0:c0 + _CHUNK]
        big = _bigs(chunk)
        if big:
            ids = set(map(id, big))
            chunk = [o for o in chunk if id(o) not in ids]
        if chunk:
            yield chunk, gc.get_referents(*chunk)
        for o in big:
            for part in _members(o):
                yield [o], part


def _members(o: Any) -> Iterator[List[object]]:
    """A big container's members (a dict's values, then its keys), a slice at a time."""
    for source in ((o.values(), o.keys()) if isinstance(o, dict) else (o,)):
        it = iter(source)
        while True:
            try:
                part = list(islice(it, _BIG))
            except RuntimeError:  # changed size while we read it (another thread): what we have
                return
            if not part:
                break
            yield part


def _holder(objs: Sequence[object], i: int) -> Optional[object]:
    """The first object of ``objs`` that refers to the object with id ``i``: a C-level pass
    over slices of ``objs``, then one slice object by object (big containers member by member,
    in C too)."""
    if len(objs) == 1:
        return objs[0]  # a big container's own batch
    referents = gc.get_referents
    for k in range(0, len(objs), 512):
        part = list(objs[k:k + 512])
        big = _bigs(part)
        for o in big:
            if any(i in map(id, m) for m in _members(o)):
                return o
        if big:
            ids = set(map(id, big))
            part = [o for o in part if id(o) not in ids]
        if i in map(id, referents(*part)):
            for o in part:
                if i in map(id, referents(o)):
                    return o
    return None


def _skip_ids() -> Set[int]:
    """Objects never followed: module namespaces (roots already, or ours), connwatch's own
    module-level objects, and the frames running connwatch code (this search's among them)."""
    out: Set[int] = {id(sys.modules)}
    # weakref.finalize keeps the arguments of its callbacks until their object dies (urllib3's
    # pools hand it their connection queue): a path through it names the wrong holder.
    fin = getattr(sys.modules.get("weakref"), "finalize", None)
    if fin is not None:
        out.add(id(getattr(fin, "_registry", None)))
    for name, mod in list(sys.modules.items()):
        if not isinstance(mod, _MODULE):
            continue  # (an object a library put in sys.modules: a root like any global)
        try:
            d = object.__getattribute__(mod, "__dict__")
        except Exception:
            continue
        if isinstance(d, dict):
            out.add(id(d))
            if _is_ours(name):
                out.add(id(mod))
                out.update(id(v) for v in list(d.values()) if not isinstance(v, _MODULE))
    # Hazard: a frame object held by a local of its own frame (sys._current_frames() gives
    # this one) is a cycle that would keep every frame below it, and what they hold, alive
    # until the collector runs. Every frame reference is dropped before returning.
    frames = sys._current_frames()
    top: Optional[types.FrameType] = None
    f: Optional[types.FrameType] = None
    try:
        for top in frames.values():
            f = top
            while f is not None:
                if f.f_code.co_filename.startswith(_OURS):
                    out.add(id(f))
                f = f.f_back
    finally:
        del frames, top, f
    return out


def _is_ours(modname: str) -> bool:
    return modname == "connwatch" or modname.startswith("connwatch.")


def _roots(skip: Set[int]) -> Iterable[Tuple[Origin, Sequence[object]]]:
    """(origin, objects) for every namespace of roots: each module's globals (a class among
    them leads to its attributes, shown as ``pkg.mod.Class.attr``), then each running frame's
    locals, thread by thread."""
    for modname, mod in list(sys.modules.items()):
        if not isinstance(mod, _MODULE) or _is_ours(modname):
            continue
        try:
            d = object.__getattribute__(mod, "__dict__")
            values = list(d.values())
        except Exception:
            continue
        yield ("module", modname, d), values
    yield from _frame_roots(skip)


def _frame_roots(skip: Set[int]) -> Iterable[Tuple[Origin, Sequence[object]]]:
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    frame: Optional[types.FrameType] = None
    f: Optional[types.FrameType] = None
    try:
        for ident, frame in frames.items():
            tname = names.get(ident, f"#{ident}")
            f = frame
            while f is not None:
                code = f.f_code
                if not code.co_filename.startswith(_OURS):
                    try:
                        if code.co_flags & _CO_OPTIMIZED:
                            local = list(f.f_locals.items())
                        elif id(f.f_locals) in skip:
                            local = []  # a module body: its globals are roots already
                        else:
                            local = list(f.f_locals.items())  # a class body, an exec namespace
                    except Exception:
                        local = []
                    if local:
                        yield ("frame", tname, code.co_name, local), [v for _k, v in local]
                f = f.f_back
    finally:
        del frames, frame, f  # see _skip_ids: no frame may outlive this generator in a cycle


def _root_label(origin: Origin, obj: object) -> str:
    """``pkg.mod.NAME`` or ``thread 'name' frame func() local x`` for a root object."""
    try:
        if origin[0] == "module":
            _kind, modname, d = origin
            for k, v in list(d.items()):
                if v is obj and isinstance(k, str):
                    return f"{modname}.{k}"
            return f"{modname}.?"
        _kind, tname, func, local = origin
        name = next((k for k, v in local if v is obj), "?")
        return f"thread {tname!r} frame {func}() local {name}"
    except Exception:
        return "?"


# --- naming the edges of a path --------------------------------------------------------------

def _render(root: str, chain: Sequence[object]) -> str:
    """``root (type) step -> (type) step ...`` for the chain of objects from a root to a target.

    The chain follows the collector's edges; the ones a person does not think in (an instance's
    ``__dict__``, a class's namespace, a function's tuple of closure cells, a generator's frame)
    are folded into the step they make: ``.attr``, ``closure 'x'``, ``local x``.
    """
    parts: List[str] = []
    i, n = 0, len(chain)
    if n >= 3 and isinstance(chain[0], type) and chain[1] is _class_dict(chain[0]):
        step = _in_dict(chain[1], chain[2], attr=True)
        if step.startswith("."):
            root += step  # a class attribute: pkg.mod.Class.attr
            i = 2
    while i < n - 1:
        p, c = chain[i], chain[i + 1]
        nxt = chain[i + 2] if i + 2 < n else None
        name = _type_name(p)
        try:
            if nxt is not None and type(c) is dict and (c is _instance_dict(p) or c is _class_dict(p)):
                parts.append(f"({name}) {_in_dict(c, nxt, attr=True)}")
                i += 2
                continue
            if type(p) is _FUNCTION:
                fn: Any = p
                if c is fn.__closure__ and i + 3 < n:
                    cells: List[Any] = list(getattr(p, "__closure__", None) or ())
                    k = next((k for k, cell in enumerate(cells) if cell is nxt), None)
                    free = fn.__code__.co_freevars
                    label = repr(free[k]) if k is not None and k < len(free) else "?"
                    parts.append(f"({name}) closure {label}")
                    i += 3
                    continue
                if nxt is not None and (c is fn.__defaults__ or c is fn.__kwdefaults__):
                    which = ".__defaults__" if c is fn.__defaults__ else ".__kwdefaults__"
                    parts.append(f"({name}) {which}{_step(c, nxt)}")
                    i += 2
                    continue
            if nxt is not None and isinstance(p, _GENERATORS) and type(c) is _FRAME:
                # 3.10 and older: through the frame (and its cached locals, once read)
                if i + 3 < n and type(nxt) is dict and nxt is c.f_locals:
                    parts.append(f"({name}) {_local(c, chain[i + 3])}")
                    i += 3
                else:
                    parts.append(f"({name}) {_local(c, nxt)}")
                    i += 2
                continue
            if nxt is not None and type(c) is dict and (type(p) is _FRAME or isinstance(p, _GENERATORS)):
                fr = p if type(p) is _FRAME else _gen_frame(p)
                if fr is not None and c is fr.f_locals:  # 3.12 and older: the frame's cached locals
                    parts.append(f"({name}) {_local(fr, nxt)}")
                    i += 2
                    continue
        except Exception:
            pass
        parts.append(f"({name}) {_step(p, c)}")
        i += 1
    if len(parts) > MAX_EDGES:
        head, tail = parts[:MAX_EDGES // 2], parts[-(MAX_EDGES // 2 - 1):]
        parts = [*head, f"... {len(parts) - len(head) - len(tail)} more ...", *tail]
    return root if not parts else root + " " + " -> ".join(parts)


def _class_dict(obj: object) -> Optional[Dict[str, Any]]:
    """The real namespace dict behind a class's ``__dict__`` mapping proxy."""
    if not isinstance(obj, type):
        return None
    try:
        inner = gc.get_referents(obj.__dict__)
    except Exception:
        return None
    return inner[0] if len(inner) == 1 and type(inner[0]) is dict else None


def _signature(path: str) -> str:
    """A path with list indices blanked: a second client in the same list says nothing new."""
    out, i = [], 0
    while i < len(path):
        ch = path[i]
        if ch == "[" and i + 1 < len(path) and path[i + 1].isdigit():
            j = i + 1
            while j < len(path) and path[j].isdigit():
                j += 1
            if j < len(path) and path[j] == "]":
                out.append("[#]")
                i = j + 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _instance_dict(obj: object) -> Optional[Dict[str, Any]]:
    if isinstance(obj, (type, _MODULE, dict, list, tuple, set, frozenset)) or type(obj) in _ATOMIC:
        return None
    try:
        d = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return d if type(d) is dict else None


def _in_dict(d: Any, child: object, attr: bool = False) -> str:
    for _attempt in range(3):
        try:
            for k, v in d.items():
                if v is child:
                    return f".{k}" if attr and isinstance(k, str) else f"[{_key(k)}]"
            for k in d:
                if k is child:
                    return "key"
            return "[?]"
        except RuntimeError:  # changed size while we looked (another thread): look again
            continue
        except Exception:
            break
    return "[?]"


def _step(p: object, c: object) -> str:
    """How ``p`` holds ``c``: ``['key']``, ``[3]``, ``member``, ``.attr``, ``closure 'x'``, ``local x``."""
    t = type(p)
    try:
        if c is t:
            return ".__class__"
        if isinstance(p, dict):
            return _in_dict(p, c)
        if isinstance(p, (list, tuple, deque)):
            for n, v in enumerate(list(p)):
                if v is c:
                    return f"[{n}]"
            return "[?]"
        if isinstance(p, (set, frozenset)):
            return "member"
        if t is _FUNCTION:
            fn: Any = p
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
                try:
                    if cell.cell_contents is c:
                        return f"closure {name!r}"
                except ValueError:
                    pass
            for n, v in enumerate(fn.__defaults__ or ()):
                if v is c:
                    return f".__defaults__[{n}]"
            for k, v in (fn.__kwdefaults__ or {}).items():
                if v is c:
                    return f".__kwdefaults__[{k!r}]"
            return _in_dict(getattr(fn, "__dict__", {}), c, attr=True)
        if isinstance(p, type):
            return _in_dict(p.__dict__, c, attr=True)
        if t is types.MethodType:
            return ".__self__" if getattr(p, "__self__", None) is c else ".__func__"
        if t is _FRAME:
            fr: Any = p
            if fr.f_back is c:
                return ".f_back"
            return _local(fr, c)
        if isinstance(p, _GENERATORS):
            fr = _gen_frame(p)
            if fr is not None:
                return _local(fr, c)
        if t is types.CellType:
            return ".cell_contents"
        if t is types.TracebackType:
            return ".tb_frame" if getattr(p, "tb_frame", None) is c else ".tb_next"
        d = _instance_dict(p)
        if d is not None:
            name = _in_dict(d, c, attr=True)
            if name.startswith("."):
                return name
        slot = _slot(p, c)
        if slot is not None:
            return slot
    except Exception:
        pass
    return "referent"


def _gen_frame(gen: object) -> Any:
    return getattr(gen, "gi_frame", None) or getattr(gen, "cr_frame", None) or getattr(gen, "ag_frame", None)


def _local(frame: Any, c: object) -> str:
    try:
        for k, v in list(frame.f_locals.items()):
            if v is c:
                return f"local {k}"
    except Exception:
        pass
    return "referent"


def _slot(p: object, c: object) -> Optional[str]:
    t = type(p)
    for klass in t.__mro__:
        names = klass.__dict__.get("__slots__")
        if names is None:
            continue
        if isinstance(names, str):
            names = (names,)
        for name in names:
            if not isinstance(name, str):
                continue
            real = f"_{klass.__name__.lstrip('_')}{name}" if name.startswith("__") and not name.endswith("__") else name
            desc: Any = klass.__dict__.get(real)
            if type(desc).__name__ != "member_descriptor":
                continue
            try:
                if desc.__get__(p, t) is c:
                    return f".{name}"
            except AttributeError:
                continue
    return None


def _type_name(obj: object) -> str:
    t = type(obj)
    try:
        if t is _FUNCTION or t is types.MethodType:
            fn: Any = obj
            return f"function {getattr(fn, '__qualname__', '?')}" if t is _FUNCTION \
                else f"method {getattr(fn.__func__, '__qualname__', '?')}"
        if isinstance(obj, type):
            return f"class {obj.__qualname__}"
        if isinstance(obj, _GENERATORS):
            return f"{t.__name__} {getattr(obj, '__qualname__', '?')}"
        if t is _FRAME:
            code: Any = getattr(obj, "f_code", None)
            return f"frame {code.co_name}()"
    except Exception:
        pass
    return t.__name__


def _key(k: object) -> str:
    """A dict key as shown in a path: short, and never a secret-looking string whole."""
    t = type(k)
    if isinstance(k, str):
        return repr(_redact(k)) if not _secretish(k) else f"<str len {len(k)}>"
    if t in (int, float, bool, type(None)):
        return repr(k)
    if isinstance(k, bytes):
        return f"<bytes len {len(k)}>"
    if isinstance(k, tuple) and t is tuple and len(k) <= 4:
        return "(" + ", ".join(_key(x) for x in k) + ("," if len(k) == 1 else "") + ")"
    return f"<{t.__name__}>"


def _secretish(s: str) -> bool:
    """A token, key or id by its looks: long, letters and digits mixed, no separators."""
    if len(s) < 16 or any(ch in s for ch in " /:.@"):
        return False
    digits = sum(ch.isdigit() for ch in s)
    letters = sum(ch.isalpha() for ch in s)
    return digits >= 3 and letters >= 3


def _redact(s: str) -> str:
    scheme, sep, rest = s.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        s = f"{scheme}://***@{rest.split('@', 1)[1]}"  # credentials in a URL
    return s if len(s) <= _KEY_CHARS else s[:_KEY_CHARS - 3] + "..."
