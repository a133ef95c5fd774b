"""``connwatch report``: live clients by call site, per process, from snapshot files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from .._fanin import by_upstream
from .._snapshot import Snapshot, Statistic
from ._load import load_all, resolve, snapshot_dir
from ._render import (
    EXIT_NO_DATA,
    EXIT_OK,
    PLAIN,
    Style,
    age,
    churn_text,
    churning,
    err,
    fd_exhaustion_lines,
    fd_line,
    process_state,
    rate_text,
    short,
    site_text,
    suspected,
    use_colour,
)


def format_report(snap: Snapshot, top: int = 10, now: Optional[float] = None, path: str = "",
                  style: Style = PLAIN) -> str:
    """The human-readable report of one snapshot."""
    now = time.time() if now is None else now
    out: List[str] = []
    argv = " ".join(snap.argv) if snap.argv else "?"
    state = process_state(snap)
    service = f" service {snap.service}" if snap.service else ""
    out.append(style.bold(f"pid {snap.pid} on {snap.host}{service} [{state}]: {argv}"))
    out.append(f"  snapshot {age(max(0.0, now - snap.time))} ago{(' (' + path + ')') if path else ''}")
    out.append(f"  {fd_line(snap)}")
    out.append(
        f"  clients: {snap.live} live, {snap.created} created, {snap.closed} closed"
        f" ({snap.gc_released} released only by garbage collection, never closed)"
    )
    leaks = suspected(snap)
    if leaks:
        out.append("  " + style.red(f"suspected leaks: {len(leaks)} call site(s) whose live count keeps rising"))
    churns = churning(snap)
    if churns:
        out.append("  " + style.yellow(f"suspected churn: {len(churns)} call site(s) build a new client per call "
                                       "(closed soon after: a new connection and handshake every time)"))
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
    # The top sites by live count, and every flagged site (a site that churns holds few clients).
    shown = stats[:top] + [s for s in stats[top:] if (s.churn is not None and s.churn.suspected)
                           or (s.growth is not None and s.growth.suspected)]
    for s in shown:
        site = s.site
        where = f"{short(site.file)}:{site.line} ({site.function})" if site else "?"
        if site is not None and site.library:
            where += " [library: no app frame]"
        growth = s.growth
        rate = rate_text(growth.per_min) if growth is not None and growth.samples >= 2 else "-"
        flag = ""
        if growth is not None and growth.suspected:
            flag = "  " + style.red("<< suspected leak")
        churn = s.churn is not None and s.churn.suspected
        if churn:
            flag += "  " + style.yellow("<< suspected churn")
        row = (f"  {s.live:>6} {s.created:>8} {s.closed:>7} {s.gc_released:>5} {age(s.oldest_age_s):>7} "
               f"{rate:>10}  {s.label():<26} {where}")
        out.append((style.red(row) if growth is not None and growth.suspected else row) + flag)
        if churn:
            out.append(style.yellow(f"  {pad}  {churn_text(s)}"))
        if s.upstreams:
            ups = ", ".join(f"{u} ({n})" for u, n in sorted(s.upstreams, key=lambda x: -x[1])[:5])
            out.append(f"  {pad}  upstreams: {ups}")
        if site is not None and site.traceback and s.live:
            out.append(style.dim(f"  {pad}  traceback (most recent call last):"))
            for f, ln, fn in reversed(site.traceback):
                out.append(style.dim(f"  {pad}    {short(f)}:{ln} in {fn}"))
        out.extend(retainer_lines(s, f"  {pad}  ", style))
    if len(stats) > len(shown):
        out.append(f"  ... {len(stats) - len(shown)} more call sites (use --top N)")
    out.extend(retainer_search_lines(snap))
    return "\n".join(out)


def retainer_lines(s: Statistic, indent: str, style: Style = PLAIN) -> List[str]:
    """``held by:`` lines for a call site whose snapshot carries retainers."""
    if s.retainers is None:
        return []
    if not s.retainers:
        return [indent + style.dim("held by: no path found from module globals, class attributes or thread frames")]
    return [indent + "held by: " + style.yellow(path) for path in s.retainers]


def retainer_search_lines(snap: Snapshot) -> List[str]:
    """One line on what the retainer search cost, when the snapshot has one."""
    info = snap.extra.get("retainers_search") if snap.extra else None
    if not isinstance(info, dict):
        return []
    try:
        line = (f"  retainers: searched {int(info.get('visited') or 0):,} objects in "
                f"{float(info.get('elapsed_ms') or 0.0):.0f} ms")
        if info.get("truncated"):
            line += (f", stopped at its bound ({info.get('limit')}: {int(info.get('max_objects') or 0):,} "
                     f"objects, {float(info.get('max_ms') or 0.0):.0f} ms): some paths may be missing")
    except (TypeError, ValueError):
        return []
    return ["", line]


def format_fanin(upstreams: List[Dict[str, Any]], processes: int, top: int = 10, style: Style = PLAIN) -> str:
    """The human-readable fan-in: live clients per upstream across the processes of a folder."""
    total = sum(u["live"] for u in upstreams)
    out = [style.bold(f"fan-in: {total} live clients to {len(upstreams)} upstream(s) "
                      f"from {processes} process{'es' if processes != 1 else ''}")]
    if not upstreams:
        out.append("  no live client with a known upstream")
    for u in upstreams:
        services = ", ".join(u["services"]) or "-"
        out.append("")
        out.append(style.bold(f"  {u['upstream']}") + f": {u['live']} live from {u['processes']} "
                   f"process{'es' if u['processes'] != 1 else ''} (services: {services})")
        out.append(f"    {'LIVE':>6} {'PROCS':>5}  {'KIND':<26} CALL SITE")
        for c in u["callsites"][:top]:
            out.append(f"    {c['live']:>6} {c['processes']:>5}  {c['kind']:<26} "
                       f"{site_text(c['file'], c['line'], c['function'])}")
        if len(u["callsites"]) > top:
            out.append(f"    ... {len(u['callsites']) - top} more call sites (use --top N)")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    paths, error = resolve(args.target)
    if error:
        err(f"report: {error}")
        return EXIT_NO_DATA
    good, bad = load_all(paths)
    for msg in bad:
        err(f"report: skipped {msg}")
    if not good:
        return EXIT_NO_DATA
    good.sort(key=lambda ps: (-ps[1].live, ps[1].pid))
    if args.html:
        return _write_html(args.html, good, args.target)
    if args.by == "upstream":
        fan = by_upstream(s for _, s in good)
        if args.json:
            print(json.dumps({"processes": len(good), "upstreams": fan}, indent=1))
        else:
            print(format_fanin(fan, len(good), args.top, Style(use_colour(sys.stdout))))
        return EXIT_OK
    if args.json:
        data: Any = [s.to_dict() for _, s in good]
        if len(good) == 1 and not os.path.isdir(args.target or ""):
            data = data[0]
        print(json.dumps(data, indent=1))
        return EXIT_OK
    now = time.time()
    style = Style(use_colour(sys.stdout))
    print("\n\n".join(format_report(s, args.top, now, short(p), style) for p, s in good))
    return EXIT_OK


def _write_html(out: str, good: List[Tuple[str, Snapshot]], target: Optional[str]) -> int:
    from .._snapshot import write_atomic
    from ._html import histories, render

    hists = histories(good)
    page = render(hists, source=short(target or snapshot_dir(), 80))
    try:
        write_atomic(out, page.encode("utf-8"))
    except OSError as e:
        err(f"report: cannot write {out}: {e.strerror or e}")
        return EXIT_NO_DATA
    def n(count: int, word: str, plural: str = "s") -> str:
        return f"{count} {word}{plural if count != 1 else ''}"

    sites = sum(len(h[-1][1].stats) for h in hists)
    print(f"wrote {out}: {n(len(hists), 'process', 'es')}, {n(sites, 'call site')}, "
          f"{n(len(good), 'snapshot file')}, {len(page.encode('utf-8')):,} bytes")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add the ``report`` command to the parser's subcommands."""
    rep = sub.add_parser("report", help="show live clients by call site from snapshot files")
    rep.add_argument("target", nargs="?", help="snapshot file, pid, or folder (default: this environment's folder)")
    rep.add_argument("--json", action="store_true", help="print the snapshot JSON")
    rep.add_argument("--top", type=int, default=10, metavar="N", help="call sites to show per process (10)")
    rep.add_argument("--by", choices=["callsite", "upstream"], default="callsite",
                     help="callsite: each process's call sites (default); upstream: live clients summed per "
                          "host:port across every process, with the services and call sites that hold them")
    rep.add_argument("--html", metavar="OUT.html",
                     help="write one self-contained HTML page instead (flame graph of live clients by stack, "
                          "charts per call site, summary; opens offline): every snapshot file of the target, "
                          "several files of one process as its history")
    rep.set_defaults(func=main)
