"""The ``connwatch`` command: run, report, top, diff, doctor.

Human output is coloured only on a terminal (and never with ``NO_COLOR``); ``--json`` gives
machines the same facts.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _config
from ._snapshot import Snapshot, SnapshotError, Statistic

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_NO_DATA = 2


def _err(msg: str) -> None:
    print(f"connwatch: {msg}", file=sys.stderr)


# --- colour ----------------------------------------------------------------------------------

def use_colour(stream: Any) -> bool:
    """Colour only for a person at a terminal: a TTY, no ``NO_COLOR``, not ``TERM=dumb``."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Style:
    """ANSI styles that turn into plain text when colour is off."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled

    def _sgr(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def red(self, text: str) -> str:
        return self._sgr("31;1", text)

    def yellow(self, text: str) -> str:
        return self._sgr("33", text)

    def green(self, text: str) -> str:
        return self._sgr("32", text)

    def bold(self, text: str) -> str:
        return self._sgr("1", text)

    def dim(self, text: str) -> str:
        return self._sgr("2", text)

    def reverse(self, text: str) -> str:
        return self._sgr("7", text)


PLAIN = Style(False)


# --- run -------------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    cmd: List[str] = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        _err("run: give the command to run after --, e.g. connwatch run -- python app.py")
        return EXIT_USAGE
    env = os.environ
    env[_config.ENABLED] = "1"
    settings = [
        (args.dir, _config.DIR), (args.interval, _config.SNAPSHOT_INTERVAL),
        (args.cap, _config.CAP), (args.cap_per_callsite, _config.CAP_PER_CALLSITE),
        (args.cap_per_upstream, _config.CAP_PER_UPSTREAM), (args.cap_mode, _config.CAP_MODE),
        (args.exporter, _config.EXPORTER), (args.service, _config.SERVICE),
        (args.disable_patches, _config.DISABLED_PATCHES),
    ]
    for value, var in settings:
        if value is not None:
            env[var] = os.path.abspath(value) if var == _config.DIR else str(value)
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        _err(f"run: command not found: {cmd[0]}")
        return 127
    except OSError as e:
        _err(f"run: cannot run {cmd[0]}: {e.strerror or e}")
        return 126
    return EXIT_OK  # pragma: no cover - exec does not return


# --- reading snapshot files ------------------------------------------------------------------

def snapshot_dir() -> str:
    """The folder the agent writes to in this environment."""
    raw = os.environ.get(_config.DIR)
    return os.path.abspath(os.path.expanduser(raw)) if raw and raw.strip() else _config.default_dir()


def resolve(target: Optional[str]) -> Tuple[List[str], Optional[str]]:
    """Snapshot files for PATH, PID or DIR (default: this environment's folder).

    Returns (paths, error message or None).
    """
    if target is None:
        target = snapshot_dir()
        if not os.path.isdir(target):
            return [], f"no snapshot folder at {target} (is the agent enabled? set CONNWATCH_DIR or pass a path)"
    if os.path.isdir(target):
        paths = sorted(p for p in glob.glob(os.path.join(target, "*.json")) if not os.path.basename(p).startswith("."))
        if not paths:
            return [], f"no snapshot files in {target}"
        return paths, None
    if target.isdigit() and not os.path.exists(target):
        folder = snapshot_dir()
        paths = sorted(glob.glob(os.path.join(folder, f"*-{int(target)}.json")))
        if not paths:
            return [], f"no snapshot file for pid {target} in {folder}"
        return paths, None
    return [target], None


def load_all(paths: Sequence[str]) -> Tuple[List[Tuple[str, Snapshot]], List[str]]:
    """Load each path; returns (good snapshots, error messages for the bad ones)."""
    good, bad = [], []
    for p in paths:
        try:
            good.append((p, Snapshot.load(p)))
        except SnapshotError as e:
            bad.append(str(e))
    return good, bad


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# --- report ----------------------------------------------------------------------------------

def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _short(path: str, width: int = 60) -> str:
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".." + os.sep) and len(rel) < len(path):
            path = rel
    except ValueError:
        pass
    return path if len(path) <= width else "..." + path[-(width - 3):]


def fd_line(snap: Snapshot) -> str:
    """``fds: 57 open of 1024 (5.6%)``."""
    if snap.fds_open is None:
        return "fds: unknown"
    if not snap.fds_limit:
        return f"fds: {snap.fds_open} open (no limit)"
    return f"fds: {snap.fds_open} open of {snap.fds_limit} ({100.0 * snap.fds_open / snap.fds_limit:.1f}%)"


def _rate(per_min: Optional[float]) -> str:
    if per_min is None:
        return "-"
    if abs(per_min) < 0.05:
        return "0/min"
    if abs(per_min) >= 100:
        return f"{per_min:+.0f}/min"
    return f"{per_min:+.1f}/min"


def site_text(file: str, line: int, function: str, width: int = 60) -> str:
    """``file:line (function)`` with the file shortened for a terminal."""
    return f"{_short(file, width)}:{line} ({function})"


def fd_exhaustion(snap: Snapshot) -> Optional[Dict[str, Any]]:
    """The snapshot's ``fd_exhaustion`` object, if it has a well-formed one."""
    fx = snap.extra.get("fd_exhaustion") if snap.extra else None
    if not isinstance(fx, dict):
        return None
    eta = fx.get("eta_s")
    if eta is not None and not isinstance(eta, (int, float)):
        return None
    return fx


def fd_exhaustion_lines(snap: Snapshot, style: Style = PLAIN) -> List[str]:
    """Report lines for the time until the fd limit and the call sites that drive it."""
    fx = fd_exhaustion(snap)
    if fx is None:
        return []
    rate = fx.get("rate_per_s")
    window = fx.get("window_s")
    win = f" over the last {_age(window)}" if isinstance(window, (int, float)) and window > 0 else ""
    eta = fx.get("eta_s")
    if eta is None:
        return [f"fd exhaustion: not expected (open fds not rising{win})"]
    per_min = float(rate) * 60.0 if isinstance(rate, (int, float)) else 0.0
    out = [style.red(f"fd exhaustion: the fd limit is reached in ~{_age(float(eta))}")
           + f" at the current rate ({per_min:+.1f} fds/min{win})"]
    drivers = fx.get("drivers")
    if isinstance(drivers, list):
        for d in drivers:
            if not isinstance(d, dict):
                continue
            try:
                where = site_text(str(d["file"]), int(d["line"]), str(d["function"]))
                kind = f"{d['kind']}/{d['role']}" if d.get("role") else str(d["kind"])
                out.append(f"  driven by {where} {kind} {_rate(float(d['growth_per_min']))}")
            except (KeyError, TypeError, ValueError):
                continue
    return out


def suspected(snap: Snapshot) -> List[Statistic]:
    """Call sites of the snapshot flagged as suspected leaks, fastest growth first."""
    out = [s for s in snap.stats if s.growth is not None and s.growth.suspected]
    return sorted(out, key=lambda s: -(s.growth.per_min if s.growth else 0.0))


def format_report(snap: Snapshot, top: int = 10, now: Optional[float] = None, path: str = "",
                  style: Style = PLAIN) -> str:
    """The human-readable report of one snapshot."""
    now = time.time() if now is None else now
    out: List[str] = []
    argv = " ".join(snap.argv) if snap.argv else "?"
    state = process_state(snap)
    service = f" service {snap.service}" if snap.service else ""
    out.append(style.bold(f"pid {snap.pid} on {snap.host}{service} [{state}]: {argv}"))
    out.append(f"  snapshot {_age(max(0.0, now - snap.time))} ago{(' (' + path + ')') if path else ''}")
    out.append(f"  {fd_line(snap)}")
    out.append(
        f"  clients: {snap.live} live, {snap.created} created, {snap.closed} closed"
        f" ({snap.gc_released} released only by garbage collection, never closed)"
    )
    leaks = suspected(snap)
    if leaks:
        out.append("  " + style.red(f"suspected leaks: {len(leaks)} call site(s) whose live count keeps rising"))
    out.extend("  " + line for line in fd_exhaustion_lines(snap, style))
    cap = snap.cap or {}
    limits = [f"{k}={cap[k]}" for k in ("limit", "per_callsite", "per_upstream") if cap.get(k) is not None]
    if limits or cap.get("exceeded"):
        mode, hits = cap.get("mode", "warn"), cap.get("exceeded", 0)
        out.append(f"  cap: {', '.join(limits) or 'none'} mode={mode} exceeded={hits}")
    stats = snap.statistics("callsite")
    if not stats:
        out.append("  no clients tracked yet")
        return "\n".join(out)
    out.append("")
    out.append(f"  {'LIVE':>6} {'CREATED':>8} {'CLOSED':>7} {'GC':>5} {'OLDEST':>7} {'GROWTH':>10}  "
               f"{'KIND':<26} CALL SITE")
    pad = " " * 49
    for s in stats[:top]:
        site = s.site
        where = f"{_short(site.file)}:{site.line} ({site.function})" if site else "?"
        if site is not None and site.library:
            where += " [library: no app frame]"
        growth = s.growth
        rate = _rate(growth.per_min) if growth is not None and growth.samples >= 2 else "-"
        flag = ""
        if growth is not None and growth.suspected:
            flag = "  " + style.red("<< suspected leak")
        row = (f"  {s.live:>6} {s.created:>8} {s.closed:>7} {s.gc_released:>5} {_age(s.oldest_age_s):>7} "
               f"{rate:>10}  {s.label():<26} {where}")
        out.append((style.red(row) if flag else row) + flag)
        if s.upstreams:
            ups = ", ".join(f"{u} ({n})" for u, n in sorted(s.upstreams, key=lambda x: -x[1])[:5])
            out.append(f"  {pad}  upstreams: {ups}")
        if site is not None and site.traceback and s.live:
            out.append(style.dim(f"  {pad}  traceback (most recent call last):"))
            for f, ln, fn in reversed(site.traceback):
                out.append(style.dim(f"  {pad}    {_short(f)}:{ln} in {fn}"))
    if len(stats) > top:
        out.append(f"  ... {len(stats) - top} more call sites (use --top N)")
    return "\n".join(out)


def process_state(snap: Snapshot) -> str:
    """``exited`` (wrote its final snapshot), ``gone`` (no such pid here) or ``running``."""
    if snap.final:
        return "exited"
    return "running" if snap.host != _host() or pid_alive(snap.pid) else "gone"


def _host() -> str:
    from ._snapshot import hostname

    return hostname()


def _report(args: argparse.Namespace) -> int:
    paths, error = resolve(args.target)
    if error:
        _err(f"report: {error}")
        return EXIT_NO_DATA
    good, bad = load_all(paths)
    for msg in bad:
        _err(f"report: skipped {msg}")
    if not good:
        return EXIT_NO_DATA
    good.sort(key=lambda ps: (-ps[1].live, ps[1].pid))
    if args.json:
        data: Any = [s.to_dict() for _, s in good]
        if len(good) == 1 and not os.path.isdir(args.target or ""):
            data = data[0]
        print(json.dumps(data, indent=1))
        return EXIT_OK
    now = time.time()
    style = Style(use_colour(sys.stdout))
    print("\n\n".join(format_report(s, args.top, now, _short(p), style) for p, s in good))
    return EXIT_OK


# --- diff ------------------------------------------------------------------------------------

SiteKey = Tuple[str, Optional[str], str, int, str]  # (kind, role, file, line, function)


def _site_key(s: Statistic) -> SiteKey:
    site = s.site
    return (s.kind, s.role, site.file if site else "?", site.line if site else 0, site.function if site else "?")


class Group:
    """One side of a diff: the snapshots of a file, or of every process in a folder."""

    def __init__(self, target: str, snaps: List[Tuple[str, Snapshot]], skipped: List[str]) -> None:
        self.target = target
        self.snaps = snaps
        self.skipped = skipped
        self.sites: Dict[SiteKey, List[int]] = {}  # key -> [live, created, gc_released, processes]
        for _p, snap in snaps:
            for s in snap.stats:
                row = self.sites.setdefault(_site_key(s), [0, 0, 0, 0])
                row[0] += s.live
                row[1] += s.created
                row[2] += s.gc_released
                row[3] += 1

    @property
    def processes(self) -> int:
        return len(self.snaps)

    def live(self, key: SiteKey) -> float:
        """Live clients of ``key`` per process of the group."""
        row = self.sites.get(key)
        return row[0] / self.processes if row and self.processes else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"target": self.target, "processes": self.processes,
                "pids": [s.pid for _, s in self.snaps], "skipped": self.skipped}


def load_group(target: str) -> Tuple[Optional[Group], Optional[str]]:
    """Load a snapshot file or folder; returns (group, error message)."""
    if not os.path.exists(target):
        return None, f"{target}: no such file or folder"
    paths, error = resolve(target)
    if error:
        return None, error
    good, bad = load_all(paths)
    if not good:
        return None, "; ".join(bad) or f"{target}: no readable snapshot"
    return Group(target, good, bad), None


def _num(x: float) -> Any:
    return int(x) if float(x).is_integer() else round(x, 3)


def diff_groups(old: Group, new: Group, max_growth: Optional[float] = None,
                max_ratio: Optional[float] = None) -> Dict[str, Any]:
    """Per call site change of live clients (per process) from ``old`` to ``new``.

    A call site exceeds ``max_growth`` when it gained more than that many live clients, and
    ``max_ratio`` when NEW / max(OLD, 1) is above it (so a new call site with one client has
    ratio 1, not infinity).
    """
    rows = []
    for key in list(new.sites) + [k for k in old.sites if k not in new.sites]:
        a, b = old.live(key), new.live(key)
        growth = b - a
        ratio = b / max(a, 1.0)
        exceeded = []
        if max_growth is not None and growth > max_growth:
            exceeded.append(f"growth {growth:+g} > {max_growth:g}")
        if max_ratio is not None and ratio > max_ratio:
            exceeded.append(f"ratio {ratio:.2f} > {max_ratio:g}")
        n = new.sites.get(key)
        o = old.sites.get(key)
        rows.append({
            "kind": key[0], "role": key[1], "file": key[2], "line": key[3], "function": key[4],
            "old_live": _num(a), "new_live": _num(b), "growth": _num(growth), "ratio": round(ratio, 3),
            "old_created": o[1] if o else 0, "new_created": n[1] if n else 0,
            "new_gc_released": n[2] if n else 0,
            "exceeded": exceeded,
        })
    rows.sort(key=lambda r: (not r["exceeded"], -abs(r["growth"]), -r["new_live"], r["file"], r["line"]))
    failed = [r for r in rows if r["exceeded"]]
    return {
        "old": old.to_dict(), "new": new.to_dict(),
        "per_process": old.processes > 1 or new.processes > 1,
        "thresholds": {"max_growth": max_growth, "max_ratio": max_ratio},
        "passed": not failed, "exceeded": len(failed),
        "callsites": rows,
    }


def format_diff(result: Dict[str, Any], top: int = 20, style: Style = PLAIN) -> str:
    """The human-readable table of :func:`diff_groups`."""
    old, new = result["old"], result["new"]
    unit = "live clients per process" if result["per_process"] else "live clients"
    out = [style.bold(f"{old['target']} ({old['processes']} process{'es' if old['processes'] != 1 else ''})"
                      f" -> {new['target']} ({new['processes']} process{'es' if new['processes'] != 1 else ''}),"
                      f" {unit} per call site")]
    rows = [r for r in result["callsites"] if r["growth"] or r["exceeded"] or r["new_live"]]
    if not rows:
        out.append("  no live clients on either side")
    else:
        out.append(f"  {'OLD':>7} {'NEW':>7} {'GROWTH':>7} {'RATIO':>7}  {'KIND':<22} CALL SITE")
        for r in rows[:top]:
            kind = f"{r['kind']}/{r['role']}" if r["role"] else r["kind"]
            line = (f"  {r['old_live']:>7} {r['new_live']:>7} {r['growth']:>+7} {r['ratio']:>6.2f}x  "
                    f"{kind:<22} {site_text(r['file'], r['line'], r['function'])}")
            if r["exceeded"]:
                line = style.red(line + "  FAIL: " + ", ".join(r["exceeded"]))
            out.append(line)
        if len(rows) > top:
            out.append(f"  ... {len(rows) - top} more call sites (use --top N or --json)")
    th = result["thresholds"]
    given = [f"--max-growth {th['max_growth']:g}" if th["max_growth"] is not None else "",
             f"--max-ratio {th['max_ratio']:g}" if th["max_ratio"] is not None else ""]
    given_text = " ".join(g for g in given if g)
    if not given_text:
        out.append("result: no thresholds given (--max-growth N, --max-ratio R); pass")
    elif result["passed"]:
        out.append(style.green(f"result: PASS ({given_text})"))
    else:
        out.append(style.red(f"result: FAIL: {result['exceeded']} call site(s) over a threshold ({given_text})"))
    return "\n".join(out)


def _diff(args: argparse.Namespace) -> int:
    if args.max_growth is not None and args.max_growth < 0:
        _err("diff: --max-growth must be 0 or more")
        return EXIT_USAGE
    if args.max_ratio is not None and not args.max_ratio > 0:
        _err("diff: --max-ratio must be more than 0")
        return EXIT_USAGE
    groups = []
    for target in (args.old, args.new):
        group, error = load_group(target)
        if group is None:
            _err(f"diff: {error}")
            return EXIT_NO_DATA
        for msg in group.skipped:
            _err(f"diff: skipped {msg}")
        groups.append(group)
    result = diff_groups(groups[0], groups[1], args.max_growth, args.max_ratio)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_diff(result, args.top, Style(use_colour(sys.stdout))))
    return EXIT_OK if result["passed"] else EXIT_FAIL


# --- top -------------------------------------------------------------------------------------

def scan(folder: str) -> Tuple[List[Tuple[str, Snapshot]], List[Tuple[str, str]]]:
    """Every snapshot in ``folder``: (good (path, snapshot), skipped (path, reason)).

    A file that vanished between listing and reading (a process's atomic rename, or a cleanup)
    is neither: it is simply not there any more.
    """
    good: List[Tuple[str, Snapshot]] = []
    skipped: List[Tuple[str, str]] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return good, skipped
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            good.append((path, Snapshot.load(path)))
        except SnapshotError as e:
            if os.path.exists(path):
                msg = str(e)
                skipped.append((path, msg[len(path) + 2:] if msg.startswith(path + ": ") else msg))
        except Exception as e:  # never let one odd file stop the view
            skipped.append((path, f"unreadable ({type(e).__name__}: {e})"))
    return good, skipped


def _site_dict(s: Statistic) -> Dict[str, Any]:
    site = s.site
    g = s.growth
    return {"kind": s.kind, "role": s.role, "file": site.file if site else "?", "line": site.line if site else 0,
            "function": site.function if site else "?", "live": s.live, "created": s.created,
            "gc_released": s.gc_released, "oldest_age_s": s.oldest_age_s,
            "growth_per_min": None if g is None else round(g.per_min, 3),
            "suspected_leak": bool(g is not None and g.suspected)}


def process_summary(path: str, snap: Snapshot, now: float, top: int = 3) -> Dict[str, Any]:
    """What ``connwatch top`` shows for one process (also its ``--json`` form)."""
    fx = fd_exhaustion(snap)
    return {
        "pid": snap.pid, "host": snap.host, "service": snap.service, "argv": list(snap.argv),
        "state": process_state(snap), "path": path, "snapshot_age_s": round(max(0.0, now - snap.time), 3),
        "fds": {"open": snap.fds_open, "limit": snap.fds_limit},
        "live": snap.live, "created": snap.created, "gc_released": snap.gc_released,
        "top_callsites": [_site_dict(s) for s in snap.statistics("callsite")[:top] if s.live],
        "suspected_leaks": [_site_dict(s) for s in suspected(snap)],
        "fd_exhaustion_eta_s": fx.get("eta_s") if fx else None,
    }


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


def render_top(folder: str, summaries: List[Dict[str, Any]], skipped: List[Tuple[str, str]], now: float,
               width: int = 120, height: int = 40, style: Style = PLAIN, interval: float = 2.0,
               interactive: bool = False) -> List[str]:
    """The lines of one ``connwatch top`` screen (already cut to ``width`` x ``height``)."""
    running = sum(1 for p in summaries if p["state"] == "running")
    leaks = sum(len(p["suspected_leaks"]) for p in summaries)
    head = (f"connwatch top - {folder} - {time.strftime('%H:%M:%S', time.localtime(now))} - "
            f"{len(summaries)} processes, {running} running, {len(summaries) - running} exited/gone"
            f" - {leaks} suspected leak{'s' if leaks != 1 else ''}")
    if skipped:
        head += f" - {len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped"
    hint = f"refresh {interval:g}s" + (", q quits" if interactive else "")
    out = [style.bold(_fit(head, width)), _fit(hint, width), ""]
    cols = (f"{'PID':>8} {'SERVICE':<14} {'STATE':<8} {'FDS':>12} {'LIVE':>6} {'GC':>5} {'LEAKS':>5} "
            f"{'FD ETA':>7}  TOP CALL SITES")
    out.append(style.reverse(cols.ljust(width)[:width]) if style.enabled else _fit(cols, width))
    body: List[str] = []
    for p in summaries:
        fds = p["fds"]
        if fds["open"] is None:
            fd_text = "?"
        elif fds["limit"]:
            fd_text = f"{fds['open']}/{fds['limit']}"
        else:
            fd_text = str(fds["open"])
        name = p["service"] or (os.path.basename(p["argv"][0]) if p["argv"] else "?")
        eta = p["fd_exhaustion_eta_s"]
        tops = ", ".join(
            f"{os.path.basename(c['file'])}:{c['line']} {c['function']} x{c['live']}" for c in p["top_callsites"]
        ) or "-"
        line = _fit(f"{p['pid']:>8} {name[:14]:<14} {p['state']:<8} {fd_text:>12} {p['live']:>6} "
                    f"{p['gc_released']:>5} {len(p['suspected_leaks']):>5} {_age(eta):>7}  {tops}", width)
        if p["suspected_leaks"] or eta is not None:
            line = style.red(line)
        elif p["state"] != "running":
            line = style.dim(line)
        elif fds["open"] is not None and fds["limit"] and fds["open"] > 0.8 * fds["limit"]:
            line = style.yellow(line)
        body.append(line)
    if not summaries:
        body.append("  no snapshot files yet (processes write them every CONNWATCH_SNAPSHOT_INTERVAL seconds)")
    leak_lines: List[str] = []
    for p in summaries:
        for c in p["suspected_leaks"]:
            kind = f"{c['kind']}/{c['role']}" if c["role"] else c["kind"]
            leak_lines.append(_fit(
                f"  pid {p['pid']}: {site_text(c['file'], c['line'], c['function'], 50)} {kind} "
                f"live {c['live']} {_rate(c['growth_per_min'])} oldest {_age(c['oldest_age_s'])}", width))
    if leak_lines:
        body += ["", style.red("SUSPECTED LEAKS")] + [style.red(x) for x in leak_lines]
    if skipped:
        body += ["", style.yellow("SKIPPED FILES (not valid connwatch snapshots)")]
        body += [style.yellow(_fit(f"  {os.path.basename(path)}: {why}", width)) for path, why in skipped]
    room = max(1, height - len(out))
    if len(body) > room:
        body = [*body[: room - 1], f"  ... {len(body) - room + 1} more lines (enlarge the terminal)"]
    return out + body


def _sort_summaries(summaries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return sorted(summaries, key=lambda p: (p["state"] != "running", -len(p["suspected_leaks"]), -p["live"], p["pid"]))


def top_data(folder: str, now: Optional[float] = None, top: int = 3) -> Dict[str, Any]:
    """One ``connwatch top`` refresh as data (the ``--json`` form)."""
    now = time.time() if now is None else now
    good, skipped = scan(folder)
    return {"dir": folder, "time": now,
            "processes": _sort_summaries([process_summary(p, s, now, top) for p, s in good]),
            "skipped": [{"path": p, "error": why} for p, why in skipped]}


class _Terminal:
    """Raw-ish terminal for the live view: cbreak input, alternate screen, hidden cursor."""

    def __init__(self, out: Any, in_fd: Optional[int]) -> None:
        self.out = out
        self.in_fd = in_fd
        self._saved: Any = None

    def __enter__(self) -> _Terminal:
        if self.in_fd is not None:
            try:
                import termios
                import tty

                self._saved = termios.tcgetattr(self.in_fd)
                tty.setcbreak(self.in_fd)
            except (ImportError, OSError):
                self._saved = None
        # Alternate screen and hidden cursor: plain VT100/xterm sequences every SSH client knows.
        self.out.write("\x1b[?1049h\x1b[?25l")
        self.out.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.out.write("\x1b[?25h\x1b[?1049l")
            self.out.flush()
        finally:
            if self._saved is not None and self.in_fd is not None:
                import termios

                termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved)

    def draw(self, lines: List[str]) -> None:
        self.out.write("\x1b[H" + "".join(line + "\x1b[K\r\n" for line in lines[:-1])
                       + (lines[-1] + "\x1b[K" if lines else "") + "\x1b[J")
        self.out.flush()

    def wait_key(self, timeout: float) -> Optional[str]:
        """Wait up to ``timeout`` seconds for a key; returns it, or None."""
        import select

        if self.in_fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self.in_fd], [], [], max(0.0, timeout))
        if not ready:
            return None
        data = os.read(self.in_fd, 64)
        if not data:  # stdin closed: no more keys, keep refreshing
            self.in_fd = None
            return None
        return data.decode("utf-8", "replace")


def _top(args: argparse.Namespace) -> int:
    folder = os.path.abspath(os.path.expanduser(args.dir)) if args.dir else snapshot_dir()
    if args.interval <= 0:
        _err("top: --interval must be more than 0")
        return EXIT_USAGE
    iterations = 1 if args.once else args.iterations
    if args.json and iterations is None:
        iterations = 1
    if iterations is not None and iterations < 1:
        _err("top: -n must be 1 or more")
        return EXIT_USAGE
    if (iterations == 1 or args.json) and not os.path.isdir(folder):
        _err(f"top: no snapshot folder at {folder}")
        return EXIT_NO_DATA
    interactive = not args.json and iterations is None and sys.stdout.isatty()
    if args.json:
        for i in range(iterations or 1):
            if i:
                time.sleep(args.interval)
            print(json.dumps(top_data(folder, top=args.top)), flush=True)
        return EXIT_OK
    if not interactive:
        # Batch mode (like ``top -b``): plain frames, one after another.
        count = 0
        while True:
            data = top_data(folder, top=args.top)
            lines = render_top(folder, data["processes"], [(d["path"], d["error"]) for d in data["skipped"]],
                               data["time"], width=10_000, height=10_000, interval=args.interval)
            print("\n".join(lines), flush=True)
            count += 1
            if iterations is not None and count >= iterations:
                return EXIT_OK
            print(flush=True)
            time.sleep(args.interval)
    in_fd: Optional[int] = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    style = Style(use_colour(sys.stdout))
    with _Terminal(sys.stdout, in_fd) as term:
        while True:
            import shutil

            size = shutil.get_terminal_size((120, 40))
            data = top_data(folder, top=args.top)
            term.draw(render_top(folder, data["processes"], [(d["path"], d["error"]) for d in data["skipped"]],
                                 data["time"], size.columns, size.lines, style, args.interval, in_fd is not None))
            deadline = time.monotonic() + args.interval
            while True:
                key = term.wait_key(deadline - time.monotonic())
                if key is None:
                    if time.monotonic() >= deadline:
                        break
                    continue
                if "q" in key.lower() or "\x03" in key:
                    return EXIT_OK
                if " " in key or "r" in key.lower():
                    break  # refresh now


# --- doctor ----------------------------------------------------------------------------------

OK, INFO, WARN, PROBLEM = "ok", "info", "warn", "problem"


def _check(name: str, status: str, message: str, fix: Optional[str] = None) -> Dict[str, Any]:
    return {"check": name, "status": status, "message": message, "fix": fix}


def _site_dirs() -> List[str]:
    import site

    dirs: List[str] = []
    try:
        dirs += list(site.getsitepackages())
    except AttributeError:  # pragma: no cover - old virtualenv site.py
        pass
    try:
        user = site.getusersitepackages()
        if isinstance(user, str):
            dirs.append(user)
    except AttributeError:  # pragma: no cover
        pass
    return list(dict.fromkeys(dirs))


def check_pth() -> Dict[str, Any]:
    """Is the ``connwatch.pth`` start-up hook in a site-packages folder this Python reads?"""
    import site

    fix = f"reinstall the package into this Python: {sys.executable} -m pip install --force-reinstall connwatch"
    if sys.flags.no_site:
        return _check("pth hook", PROBLEM, "Python runs with -S (no site module): .pth hooks are not read",
                      "drop -S, or call connwatch.enable() from the app")
    user_site = getattr(site, "USER_SITE", None)
    for folder in _site_dirs():
        path = os.path.join(folder, "connwatch.pth")
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            return _check("pth hook", PROBLEM, f"{path} is not readable ({e.strerror or e})", fix)
        if "connwatch.bootstrap" not in text or "auto_start" not in text:
            return _check("pth hook", PROBLEM, f"{path} is not connwatch's start-up hook", fix)
        if folder == user_site and not site.ENABLE_USER_SITE:
            return _check("pth hook", PROBLEM, f"{path} is in the user site folder, which this Python skips "
                          "(PYTHONNOUSERSITE or -s)", "install into the environment instead: pip install connwatch")
        return _check("pth hook", OK, f"{path} loads the agent when CONNWATCH_ENABLED is set")
    return _check("pth hook", PROBLEM, "no connwatch.pth in " + (", ".join(_site_dirs()) or "any site-packages"),
                  fix + "  (or use sitecustomize_example/sitecustomize.py where .pth hooks are forbidden)")


def check_enabled() -> Dict[str, Any]:
    """Is CONNWATCH_ENABLED set to a value that turns the agent on?"""
    raw = os.environ.get(_config.ENABLED)
    if raw is None:
        return _check("CONNWATCH_ENABLED", PROBLEM, "not set: the agent stays off in processes started from here",
                      "export CONNWATCH_ENABLED=1  (or run the app with: connwatch run -- CMD)")
    if _config.env_enabled():
        return _check("CONNWATCH_ENABLED", OK, f"set to {raw!r}: the agent starts in every Python process")
    return _check("CONNWATCH_ENABLED", PROBLEM, f"set to {raw!r}, which means off (on is 1, true, yes or on)",
                  "export CONNWATCH_ENABLED=1")


def check_dependencies() -> Dict[str, Any]:
    """Can the agent count open descriptors? It needs no other third-party package: /proc,
    else psutil."""
    import importlib.util

    has_psutil = importlib.util.find_spec("psutil") is not None
    if os.path.isdir("/proc/self/fd"):
        return _check("dependencies", OK, "fd counts from /proc" + (" (psutil importable)" if has_psutil else ""))
    if not has_psutil:
        return _check("dependencies", WARN, "psutil is missing and /proc is not available: fd counts unknown",
                      f"{sys.executable} -m pip install psutil")
    return _check("dependencies", OK, "fd counts from psutil (/proc is not available)")


def _sitecustomizes() -> List[str]:
    out = []
    for entry in sys.path:
        folder = os.path.abspath(entry or ".")
        for candidate in (os.path.join(folder, "sitecustomize.py"),
                          os.path.join(folder, "sitecustomize", "__init__.py")):
            if os.path.isfile(candidate):
                out.append(candidate)
    return list(dict.fromkeys(out))


def check_sitecustomize(pth_ok: bool) -> Dict[str, Any]:
    """Does a ``sitecustomize`` on sys.path shadow connwatch's, or undo its socket patch?"""
    found = _sitecustomizes()
    if not found:
        return _check("sitecustomize", OK, "no sitecustomize on sys.path")

    def text(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read(200_000)
        except OSError:
            return ""

    first = found[0]
    first_text = text(first)
    ours = [p for p in found if "connwatch" in text(p)]
    if any(s in first_text for s in ("monkey.patch_all", "monkey.patch_socket", "socket.socket =")):
        return _check("sitecustomize", WARN, f"{first} replaces the socket module after connwatch patched it "
                      "(it runs after .pth hooks): sockets may go uncounted",
                      "let it run first: call connwatch.enable() at the end of that sitecustomize")
    if ours and ours[0] != first:
        status = INFO if pth_ok else PROBLEM
        return _check("sitecustomize", status, f"{first} shadows connwatch's {ours[0]}: only the first "
                      "sitecustomize on sys.path runs" + (" (the .pth hook still loads the agent)" if pth_ok else ""),
                      None if pth_ok else f"put {os.path.dirname(ours[0])} first on PYTHONPATH (it chains the other)")
    if ours:
        more = f"; it chains {found[1]}" if len(found) > 1 else ""
        return _check("sitecustomize", OK, f"{first} is connwatch's{more}")
    return _check("sitecustomize", INFO, f"{first} runs at start-up; it does not touch connwatch"
                  + ("" if len(found) == 1 else f" (shadowing {len(found) - 1} more)"))


def check_folder() -> Dict[str, Any]:
    """Can the agent create and write its snapshot folder, and is it ours?"""
    from .exporters.snapshot_file import prepare_dir

    folder = snapshot_dir()
    fix = f"export {_config.DIR}=<a folder you own> (or fix: mkdir -p -m 700 {folder})"
    if os.path.lexists(folder) and not os.path.islink(folder) and not os.path.isdir(folder):
        return _check("snapshot folder", PROBLEM, f"{folder}: exists and is not a folder", fix)
    reason = prepare_dir(folder)
    if reason is not None:
        return _check("snapshot folder", PROBLEM, f"{folder}: {reason}", fix)
    probe = os.path.join(folder, f".doctor-{os.getpid()}.json")
    try:
        from ._snapshot import write_atomic

        write_atomic(probe, b"{}")
        os.unlink(probe)
    except OSError as e:
        return _check("snapshot folder", PROBLEM, f"{folder}: cannot write a file ({e.strerror or e})", fix)
    return _check("snapshot folder", OK, f"{folder} is ours and writable")


def _otlp_endpoint() -> Tuple[str, str, int]:
    env = os.environ
    raw = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or ""
    protocol = (env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    default_port = 4317 if protocol.strip().lower() == "grpc" else 4318
    if not raw.strip():
        return f"localhost:{default_port} (default)", "localhost", default_port
    from urllib.parse import urlsplit

    text = raw.strip()
    parts = urlsplit(text if "://" in text else "//" + text)
    port = parts.port or (443 if parts.scheme == "https" else 80 if parts.scheme == "http" else default_port)
    return text, parts.hostname or "localhost", port


def check_exporter() -> List[Dict[str, Any]]:
    """Is the metric exporter's package installed and its endpoint reachable?"""
    import importlib.util
    import socket

    cfg, warnings = _load_config()
    checks = [_check("configuration", WARN, w, "fix or unset the variable") for w in warnings]
    if not checks:
        checks.append(_check("configuration", OK, "every CONNWATCH_* setting is valid"))
    if not cfg.exporters:
        checks.append(_check("exporter", INFO, "no metric exporter (CONNWATCH_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT "
                             "unset): snapshot files only"))
        return checks
    if "otlp" in cfg.exporters:
        if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec("opentelemetry.sdk") is None:
            checks.append(_check("exporter", WARN, "the otlp exporter needs the OpenTelemetry SDK, "
                                 "which is not installed", "pip install 'connwatch[otlp]'"))
        shown, host, port = _otlp_endpoint()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
            checks.append(_check("exporter endpoint", OK, f"OTLP endpoint {shown} accepts connections"))
        except OSError as e:
            checks.append(_check("exporter endpoint", WARN, f"OTLP endpoint {shown} is not reachable "
                                 f"({e.strerror or e}): metrics will not arrive (snapshot files still work)",
                                 "start the collector, or set OTEL_EXPORTER_OTLP_ENDPOINT to where it listens"))
    if "prometheus" in cfg.exporters and importlib.util.find_spec("prometheus_client") is None:
        checks.append(_check("exporter", WARN, "the prometheus exporter needs prometheus_client",
                             "pip install 'connwatch[prometheus]'"))
    return checks


def _load_config() -> Tuple[Any, List[str]]:
    import logging

    from . import _log

    messages: List[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage().replace("connwatch: ", "", 1))

    _log.reset()  # the agent this command started (then stopped) may have reported them already
    logger = logging.getLogger(_log.LOGGER_NAME)
    handler = _Keep(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        cfg = _config.load()
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    return cfg, messages


def check_loads(timeout: float = 30.0) -> Dict[str, Any]:
    """Start a fresh Python with CONNWATCH_ENABLED=1 and see whether the agent runs in it."""
    import subprocess
    import tempfile

    code = ("import sys, connwatch; sys.stdout.write(repr((connwatch.is_enabled(), connwatch.__file__)))")
    with tempfile.TemporaryDirectory(prefix="connwatch-doctor-") as tmp:
        env = dict(os.environ)
        env.update({_config.ENABLED: "1", _config.DIR: tmp, _config.SNAPSHOT_INTERVAL: "0", _config.EXPORTER: "none"})
        try:
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return _check("start-up", PROBLEM, f"a test start of {sys.executable} failed: {e}")
    out = proc.stdout.strip()
    if proc.returncode != 0 or not out.startswith("(True"):
        detail = (proc.stderr.strip().splitlines() or [out or f"exit code {proc.returncode}"])[-1]
        return _check("start-up", PROBLEM, f"with CONNWATCH_ENABLED=1, a new {sys.executable} does not start "
                      f"the agent ({detail})", "fix the problems above (the .pth hook first)")
    return _check("start-up", OK, f"with CONNWATCH_ENABLED=1, a new {sys.executable} starts the agent")


def run_doctor() -> Dict[str, Any]:
    """Every check, in order; ``ok`` is False when a problem keeps the agent from loading."""
    checks = [check_dependencies(), check_pth(), check_enabled()]
    checks.append(check_sitecustomize(checks[1]["status"] == OK))
    checks.append(check_loads())
    checks.append(check_folder())
    checks += check_exporter()
    problems = [c for c in checks if c["status"] == PROBLEM]
    loads = next(c for c in checks if c["check"] == "start-up")["status"] == OK and checks[2]["status"] == OK
    return {"ok": not problems, "agent_will_load": loads, "python": sys.executable,
            "problems": len(problems), "checks": checks}


def format_doctor(result: Dict[str, Any], style: Style = PLAIN) -> str:
    """The human-readable form of :func:`run_doctor`."""
    marks = {OK: style.green("ok     "), INFO: style.dim("info   "), WARN: style.yellow("warn   "),
             PROBLEM: style.red("PROBLEM")}
    out = [style.bold(f"connwatch doctor ({result['python']})")]
    for c in result["checks"]:
        out.append(f"  {marks[c['status']]} {c['check']}: {c['message']}")
        if c["fix"] and c["status"] in (WARN, PROBLEM):
            out.append(f"          fix: {c['fix']}")
    if result["ok"]:
        out.append(style.green("the agent will load in this environment"))
    else:
        verdict = "the agent will not load" if not result["agent_will_load"] else "the agent loads, with problems"
        out.append(style.red(f"{verdict}: {result['problems']} problem(s) to fix"))
    return "\n".join(out)


def _doctor(args: argparse.Namespace) -> int:
    result = run_doctor()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_doctor(result, Style(use_colour(sys.stdout))))
    return EXIT_OK if result["ok"] else EXIT_FAIL


def _quiet_agent() -> None:
    # CONNWATCH_ENABLED in the shell starts the agent in this command too; its own snapshot
    # file would show up in the folder it reports on, so stop it and remove the file.
    from . import bootstrap

    if not bootstrap.is_enabled():
        return
    path = bootstrap.snapshot_path()
    bootstrap.stop(final_write=False)
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


# --- entry point -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``connwatch`` command."""
    parser = argparse.ArgumentParser(
        prog="connwatch", description="Find connection leaks: live network clients per call site."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a command with the agent enabled",
                         description="Run CMD with CONNWATCH_ENABLED=1 and the given settings.")
    run.add_argument("--dir", help="snapshot folder (CONNWATCH_DIR)")
    run.add_argument("--interval", help="seconds between snapshot files (CONNWATCH_SNAPSHOT_INTERVAL)")
    run.add_argument("--cap", help="max live clients in the process (CONNWATCH_CAP)")
    run.add_argument("--cap-per-callsite", help="max live clients from one call site")
    run.add_argument("--cap-per-upstream", help="max live clients to one host:port")
    run.add_argument("--cap-mode", choices=["warn", "raise"], help="warn (default) or raise")
    run.add_argument("--exporter", help="otlp, prometheus, console, none (comma list)")
    run.add_argument("--service", help="service name reported in snapshots and metrics")
    run.add_argument("--disable-patches", help="comma list of patches to skip")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS")
    run.set_defaults(func=_run)

    rep = sub.add_parser("report", help="show live clients by call site from snapshot files")
    rep.add_argument("target", nargs="?", help="snapshot file, pid, or folder (default: this environment's folder)")
    rep.add_argument("--json", action="store_true", help="print the snapshot JSON")
    rep.add_argument("--top", type=int, default=10, metavar="N", help="call sites to show per process (10)")
    rep.set_defaults(func=_report)

    top = sub.add_parser("top", help="live view of every process writing snapshots in a folder",
                         description="A refreshing view, like top, of the processes writing snapshot files in DIR: "
                                     "fds, live clients, top call sites, suspected leaks. q quits.")
    top.add_argument("dir", nargs="?", help="snapshot folder (default: this environment's folder)")
    top.add_argument("-d", "--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (2)")
    top.add_argument("-n", "--iterations", type=int, metavar="N", help="stop after N refreshes")
    top.add_argument("--once", action="store_true", help="print one screen and exit (same as -n 1)")
    top.add_argument("--json", action="store_true", help="print the view as JSON (one object per refresh)")
    top.add_argument("--top", type=int, default=3, metavar="N", help="call sites to show per process (3)")
    top.set_defaults(func=_top)

    dif = sub.add_parser("diff", help="per call site change between two snapshot files or folders",
                         description="Compare live clients per call site between OLD and NEW (files, or folders: "
                                     "a baseline and a canary group, compared per process). Exit 0 pass, 1 a "
                                     "threshold was exceeded, 2 unreadable input.")
    dif.add_argument("old", help="baseline snapshot file or folder")
    dif.add_argument("new", help="new snapshot file or folder")
    dif.add_argument("--max-growth", type=float, metavar="N",
                     help="fail when a call site gains more than N live clients")
    dif.add_argument("--max-ratio", type=float, metavar="R",
                     help="fail when NEW/max(OLD,1) live of a call site exceeds R")
    dif.add_argument("--json", action="store_true", help="print the comparison as JSON")
    dif.add_argument("--top", type=int, default=20, metavar="N", help="call sites to show (20)")
    dif.set_defaults(func=_diff)

    doc = sub.add_parser("doctor", help="check whether the agent will load in this environment",
                         description="Check the .pth hook, CONNWATCH_ENABLED, sitecustomize conflicts, the "
                                     "snapshot folder and the exporter endpoint; print a fix for each problem.")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.set_defaults(func=_doctor)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``connwatch`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.func is not _run:
        _quiet_agent()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
