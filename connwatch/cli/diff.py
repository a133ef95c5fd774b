"""``connwatch diff OLD NEW``: per call site change between two snapshot files or folders."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional

from .._leaks import churn_advice
from ._load import Group, load_group
from ._render import EXIT_FAIL, EXIT_NO_DATA, EXIT_OK, EXIT_USAGE, PLAIN, Style, err, site_text, use_colour


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
        nc, oc = new.churn.get(key), old.churn.get(key)
        rows.append({
            "kind": key[0], "role": key[1], "file": key[2], "line": key[3], "function": key[4],
            "old_live": _num(a), "new_live": _num(b), "growth": _num(growth), "ratio": round(ratio, 3),
            "old_created": o[1] if o else 0, "new_created": n[1] if n else 0,
            "new_gc_released": n[2] if n else 0,
            # processes of each side that flag the site as suspected churn (a client per call)
            "old_churn_processes": int(oc[0]) if oc else 0, "new_churn_processes": int(nc[0]) if nc else 0,
            "new_churn_created_per_min": round(nc[1] / nc[0], 3) if nc else None,
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
    rows = [r for r in result["callsites"]
            if r["growth"] or r["exceeded"] or r["new_live"] or r.get("new_churn_processes")]
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
            if r.get("new_churn_processes"):
                was = " (new)" if not r.get("old_churn_processes") else ""
                out.append(style.yellow(
                    f"  {'':>31}churn{was}: {r['new_churn_processes']} of {new['processes']} process(es) build a "
                    f"client per call, {r['new_churn_created_per_min']:.0f} created/min each: "
                    f"{churn_advice(r['kind'], r['role'])}"))
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


def main(args: argparse.Namespace) -> int:
    if args.max_growth is not None and args.max_growth < 0:
        err("diff: --max-growth must be 0 or more")
        return EXIT_USAGE
    if args.max_ratio is not None and not args.max_ratio > 0:
        err("diff: --max-ratio must be more than 0")
        return EXIT_USAGE
    groups = []
    for target in (args.old, args.new):
        group, error = load_group(target)
        if group is None:
            err(f"diff: {error}")
            return EXIT_NO_DATA
        for msg in group.skipped:
            err(f"diff: skipped {msg}")
        groups.append(group)
    result = diff_groups(groups[0], groups[1], args.max_growth, args.max_ratio)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_diff(result, args.top, Style(use_colour(sys.stdout))))
    return EXIT_OK if result["passed"] else EXIT_FAIL


def register(sub: Any) -> None:
    """Add the ``diff`` command to the parser's subcommands."""
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
    dif.set_defaults(func=main)
