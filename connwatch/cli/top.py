"""``connwatch top``: a live view, like top, of every process writing snapshots in a folder."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from .._fanin import by_upstream
from .._leaks import churn_advice
from .._snapshot import Snapshot, Statistic
from ._load import scan, snapshot_dir
from ._render import (
    EXIT_NO_DATA,
    EXIT_OK,
    EXIT_USAGE,
    PLAIN,
    Style,
    age,
    churning,
    err,
    fd_exhaustion,
    lifetime_text,
    process_state,
    rate_text,
    site_text,
    suspected,
    use_colour,
)


def _site_dict(s: Statistic) -> Dict[str, Any]:
    site = s.site
    g = s.growth
    return {"kind": s.kind, "role": s.role, "file": site.file if site else "?", "line": site.line if site else 0,
            "function": site.function if site else "?", "live": s.live, "created": s.created,
            "gc_released": s.gc_released, "oldest_age_s": s.oldest_age_s,
            "growth_per_min": None if g is None else round(g.per_min, 3),
            "suspected_leak": bool(g is not None and g.suspected),
            "suspected_churn": bool(s.churn is not None and s.churn.suspected),
            "churn": s.churn.to_dict() if s.churn is not None else None}


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
        "suspected_churn": [_site_dict(s) for s in churning(snap)],
        "fd_exhaustion_eta_s": fx.get("eta_s") if fx else None,
    }


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


def render_top(folder: str, summaries: List[Dict[str, Any]], skipped: List[Tuple[str, str]], now: float,
               width: int = 120, height: int = 40, style: Style = PLAIN, interval: float = 2.0,
               interactive: bool = False, upstreams: Optional[List[Dict[str, Any]]] = None) -> List[str]:
    """The lines of one ``connwatch top`` screen (already cut to ``width`` x ``height``).

    With ``upstreams`` (from :func:`connwatch._fanin.by_upstream`) the table is the upstream
    view: live clients into each ``host:port`` summed over the processes, instead of one row
    per process.
    """
    running = sum(1 for p in summaries if p["state"] == "running")
    leaks = sum(len(p["suspected_leaks"]) for p in summaries)
    head = (f"connwatch top - {folder} - {time.strftime('%H:%M:%S', time.localtime(now))} - "
            f"{len(summaries)} processes, {running} running, {len(summaries) - running} exited/gone"
            f" - {leaks} suspected leak{'s' if leaks != 1 else ''}")
    if skipped:
        head += f" - {len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped"
    view = "upstreams" if upstreams is not None else "processes"
    hint = f"refresh {interval:g}s, view: {view}" + (
        f", u: {'processes' if upstreams is not None else 'upstreams'}, q quits" if interactive else "")
    out = [style.bold(_fit(head, width)), _fit(hint, width), ""]
    if upstreams is not None:
        cols = f"{'UPSTREAM':<28} {'LIVE':>6} {'PROCS':>5} {'SERVICES':<20}  TOP CALL SITES"
    else:
        cols = (f"{'PID':>8} {'SERVICE':<14} {'STATE':<8} {'FDS':>12} {'LIVE':>6} {'GC':>5} {'LEAKS':>5} "
                f"{'FD ETA':>7}  TOP CALL SITES")
    out.append(style.reverse(cols.ljust(width)[:width]) if style.enabled else _fit(cols, width))
    body: List[str] = []
    for u in upstreams or ():
        tops = ", ".join(f"{os.path.basename(c['file'])}:{c['line']} {c['function']} x{c['live']}"
                         for c in u["callsites"]) or "-"
        services = ",".join(u["services"]) or "-"
        body.append(_fit(f"{u['upstream'][:28]:<28} {u['live']:>6} {u['processes']:>5} {services[:20]:<20}  {tops}",
                         width))
    if upstreams is not None and not upstreams and summaries:
        body.append("  no live client with a known upstream")
    for p in summaries if upstreams is None else ():
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
                    f"{p['gc_released']:>5} {len(p['suspected_leaks']):>5} {age(eta):>7}  {tops}", width)
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
                f"live {c['live']} {rate_text(c['growth_per_min'])} oldest {age(c['oldest_age_s'])}", width))
    if leak_lines:
        body += ["", style.red("SUSPECTED LEAKS")] + [style.red(x) for x in leak_lines]
    churn_lines: List[str] = []
    for p in summaries:
        for c in p.get("suspected_churn", ()):
            kind = f"{c['kind']}/{c['role']}" if c["role"] else c["kind"]
            ch = c["churn"] or {}
            churn_lines.append(_fit(
                f"  pid {p['pid']}: {site_text(c['file'], c['line'], c['function'], 50)} {kind} "
                f"{ch.get('created_per_min', 0):.0f} created/min, median lifetime "
                f"{lifetime_text(ch.get('median_lifetime_s'))}: {churn_advice(c['kind'], c['role'])}", width))
    if churn_lines:
        body += ["", style.yellow("SUSPECTED CHURN (a new client per call)")] + [style.yellow(x) for x in churn_lines]
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
    """One ``connwatch top`` refresh as data (the ``--json`` form), with both views."""
    now = time.time() if now is None else now
    good, skipped = scan(folder)
    return {"dir": folder, "time": now,
            "processes": _sort_summaries([process_summary(p, s, now, top) for p, s in good]),
            "upstreams": by_upstream((s for _, s in good), top_sites=top),
            "skipped": [{"path": p, "error": why} for p, why in skipped]}


def _frame(folder: str, data: Dict[str, Any], by_upstreams: bool, **kw: Any) -> List[str]:
    return render_top(folder, data["processes"], [(d["path"], d["error"]) for d in data["skipped"]], data["time"],
                      upstreams=data["upstreams"] if by_upstreams else None, **kw)


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


def main(args: argparse.Namespace) -> int:
    folder = os.path.abspath(os.path.expanduser(args.dir)) if args.dir else snapshot_dir()
    if args.interval <= 0:
        err("top: --interval must be more than 0")
        return EXIT_USAGE
    iterations = 1 if args.once else args.iterations
    if args.json and iterations is None:
        iterations = 1
    if iterations is not None and iterations < 1:
        err("top: -n must be 1 or more")
        return EXIT_USAGE
    if (iterations == 1 or args.json) and not os.path.isdir(folder):
        err(f"top: no snapshot folder at {folder}")
        return EXIT_NO_DATA
    interactive = not args.json and iterations is None and sys.stdout.isatty()
    by_up = args.by == "upstream"
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
            lines = _frame(folder, data, by_up, width=10_000, height=10_000, interval=args.interval)
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
            term.draw(_frame(folder, data, by_up, width=size.columns, height=size.lines, style=style,
                             interval=args.interval, interactive=in_fd is not None))
            deadline = time.monotonic() + args.interval
            while True:
                key = term.wait_key(deadline - time.monotonic())
                if key is None:
                    if time.monotonic() >= deadline:
                        break
                    continue
                if "q" in key.lower() or "\x03" in key:
                    return EXIT_OK
                if "u" in key.lower():
                    by_up = not by_up
                    break  # redraw in the other view
                if " " in key or "r" in key.lower():
                    break  # refresh now


def register(sub: Any) -> None:
    """Add the ``top`` command to the parser's subcommands."""
    top = sub.add_parser("top", help="live view of every process writing snapshots in a folder",
                         description="A refreshing view, like top, of the processes writing snapshot files in DIR: "
                                     "fds, live clients, top call sites, suspected leaks and churn. q quits; u "
                                     "switches between the process and the upstream view.")
    top.add_argument("dir", nargs="?", help="snapshot folder (default: this environment's folder)")
    top.add_argument("-d", "--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (2)")
    top.add_argument("-n", "--iterations", type=int, metavar="N", help="stop after N refreshes")
    top.add_argument("--once", action="store_true", help="print one screen and exit (same as -n 1)")
    top.add_argument("--json", action="store_true", help="print the view as JSON (one object per refresh)")
    top.add_argument("--top", type=int, default=3, metavar="N", help="call sites to show per process (3)")
    top.add_argument("--by", choices=["process", "upstream"], default="process",
                     help="rows per process (default) or per upstream host:port, summed over the processes "
                          "(the key u switches)")
    top.set_defaults(func=main)
