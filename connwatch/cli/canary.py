"""``connwatch canary BASELINE CANARY``: judge a canary group against a baseline group per call
site (snapshot folders, or ``--prometheus URL`` with label selectors); a rollout gate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from .. import _canary
from .._snapshot import SnapshotError, read_json
from ._load import resolve
from ._render import EXIT_FAIL, EXIT_NO_DATA, EXIT_OK, EXIT_USAGE, PLAIN, Style, err, site_text, use_colour

# Folders of at least this many files are read by worker processes (JSON parsing is most of a
# canary's time: ~10 ms per file of 1,000 call sites), one per core up to _MAX_WORKERS.
PARALLEL_MIN_FILES = 32
_MAX_WORKERS = 8


def _read_one(path: str) -> Tuple[str, Any]:
    """("ok", (name, [(site key, reading tuple)], fd)) or ("bad", reason): plain tuples, cheap to pickle."""
    try:
        proc = _canary.process_from_snapshot(read_json(path, tracebacks=False), source=path)
    except SnapshotError as e:
        return "bad", str(e)
    return "ok", (proc.name, [(k, tuple(r)) for k, r in proc.sites.items()], proc.fd_utilization)


def _read_all(paths: List[str], workers: Optional[int] = None) -> List[Tuple[str, Any]]:
    """Every file's _read_one result, in order; in worker processes for large folders.

    A worker is a fresh interpreter running :func:`_worker` (``python -c``: nothing of this
    process is forked or re-imported, the agent is off in it), fed paths on stdin, answering with
    pickled results on stdout. Any failure of a worker falls back to reading here, so the result
    never depends on them.
    """
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(cores, _MAX_WORKERS)
    if workers > 1 and len(paths) >= PARALLEL_MIN_FILES:
        try:
            return _read_in_workers(paths, workers)
        except Exception:  # no interpreter to start, a worker that died: read them here
            pass
    return [_read_one(path) for path in paths]


def _read_in_workers(paths: List[str], workers: int) -> List[Tuple[str, Any]]:
    import pickle
    import subprocess

    env = {**os.environ, "CONNWATCH_ENABLED": "0"}
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    shares = [paths[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-c", "from connwatch.cli.canary import _worker; _worker()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
             for _ in shares]
    try:
        for proc, share in zip(procs, shares):
            assert proc.stdin is not None
            proc.stdin.write("\n".join(share).encode("utf-8", "surrogateescape") + b"\n")
            proc.stdin.close()
        parts = []
        for proc, share in zip(procs, shares):
            assert proc.stdout is not None
            part = pickle.loads(proc.stdout.read())  # our own worker's output
            if proc.wait() != 0 or len(part) != len(share):
                raise RuntimeError("a canary reader failed")
            parts.append(part)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out: List[Tuple[str, Any]] = []
    for i in range(len(paths)):
        out.append(parts[i % workers][i // workers])
    return out


def _worker() -> None:
    """A reader process: paths on stdin (one per line), their pickled _read_one results on stdout."""
    import pickle

    paths = sys.stdin.buffer.read().decode("utf-8", "surrogateescape").splitlines()
    sys.stdout.buffer.write(pickle.dumps([_read_one(p) for p in paths], protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.flush()


def load_folder(target: str, workers: Optional[int] = None,
                ) -> Tuple[List[_canary.Process], List[str], Optional[str]]:
    """The processes of a snapshot folder (or file): (processes, skipped files' reasons, error).

    The files are read and checked as ``connwatch diff`` and ``report`` read them; unreadable
    ones are skipped with their reason; none readable is an error. ``workers``: processes that
    read a large folder (default: one per core, at most 8; 1 reads here).
    """
    if not os.path.exists(target):
        return [], [], f"{target}: no such file or folder"
    paths, error = resolve(target)
    if error:
        return [], [], error
    procs: List[_canary.Process] = []
    bad: List[str] = []
    new, reading = tuple.__new__, _canary.Reading  # (Reading._make is a Python-level call per site)
    for status, value in _read_all(paths, workers):
        if status == "ok":
            name, sites, fd = value
            procs.append(_canary.Process(name, {k: new(reading, r) for k, r in sites}, fd))
        else:
            bad.append(value)
    if not procs:
        return [], bad, "; ".join(bad) or f"{target}: no readable snapshot"
    return procs, bad, None


def _fig(side: Dict[str, Any], name: str) -> str:
    f = side.get(name)
    return "-" if f is None else f"{round(f['mean'], 1):g}"


def format_result(result: Dict[str, Any], top: int = 20, style: Style = PLAIN) -> str:
    """The human-readable verdicts of :func:`connwatch._canary.judge`."""
    b, c = result["baseline"], result["canary"]
    n = len(result["sites"])
    out = [style.bold(f"canary {c['source']} ({c['processes']} process{'es' if c['processes'] != 1 else ''}) "
                      f"vs baseline {b['source']} ({b['processes']} process{'es' if b['processes'] != 1 else ''}): "
                      f"{n} call site{'s' if n != 1 else ''}, per process (mean)")]
    shown = [s for s in result["sites"] if s["verdict"] != _canary.PASS]
    passed = [s for s in result["sites"] if s["verdict"] == _canary.PASS]
    shown += passed[:max(0, top - len(shown))]
    if shown:
        out.append(f"  {'VERDICT':<9}{'LIVE B -> C':>15} {'GROWTH/MIN B -> C':>19}  {'KIND':<20} CALL SITE")
        for s in shown:  # every failing and marginal site, then passing ones up to --top
            live = f"{_fig(s['baseline'], 'live')} -> {_fig(s['canary'], 'live')}"
            growth = f"{_fig(s['baseline'], 'growth_per_min')} -> {_fig(s['canary'], 'growth_per_min')}"
            line = (f"  {s['verdict'].upper():<9}{live:>15} {growth:>19}  {s['kind']:<20} "
                    f"{site_text(s['file'], s['line'], s['function'])}")
            paint = style.red if s["verdict"] == _canary.FAIL else style.yellow if s["verdict"] == _canary.MARGINAL \
                else (lambda x: x)
            out.append(paint(line))
            if s["verdict"] != _canary.PASS:
                out.append(paint(f"           {s['reason']}"))
        rest = len(result["sites"]) - len(shown)
        if rest > 0:
            out.append(f"  ... {rest} more passing call sites (use --top N or --json)")
    else:
        out.append("  no call sites in either group")
    fds = result.get("fds")
    if fds:
        line = f"  fd utilisation: {fds['verdict'].upper()}: {fds['reason']}"
        out.append(style.red(line) if fds["verdict"] == _canary.FAIL else line)
    counts = result["counts"]
    tail = (f"result: {result['verdict'].upper()} (score {result['score']:g}; {counts['fail']} fail, "
            f"{counts['marginal']} marginal, {counts['pass']} pass): {result['summary']}")
    out.append(style.green(tail) if result["verdict"] == _canary.PASS else style.red(tail))
    return "\n".join(out)


def _thresholds(args: argparse.Namespace) -> _canary.Thresholds:
    return _canary.Thresholds(
        alpha=args.alpha, tolerance=args.tolerance, min_shift=args.min_shift, min_growth=args.min_growth,
        leak_share=args.leak_share, min_churn=args.min_churn, min_gc=args.min_gc, min_fd=args.min_fd,
        max_new=args.max_new, max_fd_utilization=args.max_fd_utilization, min_score=args.min_score)


def _check(args: argparse.Namespace) -> Optional[str]:
    if not 0 < args.alpha < 1:
        return "--alpha must be between 0 and 1"
    if not 0 < args.leak_share <= 1:
        return "--leak-share must be more than 0 and at most 1"
    for name in ("tolerance", "min_shift", "min_growth", "min_churn", "min_gc", "min_fd", "max_new"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be 0 or more"
    return None


def main(args: argparse.Namespace) -> int:
    baseline = args.baseline if args.baseline is not None else args.baseline_pos
    canary = args.canary if args.canary is not None else args.canary_pos
    if (args.baseline is not None and args.baseline_pos is not None) or \
            (args.canary is not None and args.canary_pos is not None):
        err("canary: give BASELINE and CANARY once each (as arguments or as --baseline/--canary)")
        return EXIT_USAGE
    if baseline is None or canary is None:
        err("canary: needs a BASELINE and a CANARY (snapshot folders, or selectors with --prometheus URL)")
        return EXIT_USAGE
    problem = _check(args)
    if problem:
        err(f"canary: {problem}")
        return EXIT_USAGE
    groups: List[Tuple[str, List[_canary.Process], List[str]]] = []
    if args.prometheus:
        from .. import _promsource

        try:
            window = _promsource.parse_duration(args.window)
            step = _promsource.parse_duration(args.step)
            end = _promsource.parse_time(args.end) if args.end else None
        except ValueError as e:
            err(f"canary: {e}")
            return EXIT_USAGE
        for role, match in (("baseline", baseline), ("canary", canary)):
            try:
                procs = _promsource.read_group(args.prometheus, match, window, step, end=end, timeout=args.timeout)
            except ValueError as e:
                err(f"canary: --{role}: {e}")
                return EXIT_USAGE
            except _promsource.PromError as e:
                err(f"canary: {e}")
                return EXIT_NO_DATA
            if not procs:
                err(f"canary: no connwatch series for the {role} selector {{{match}}} in the last {args.window} "
                    f"at {args.prometheus} (is the agent's Prometheus exporter on, CONNWATCH_EXPORTER=prometheus, "
                    f"and scraped with these labels?)")
                return EXIT_NO_DATA
            groups.append((match, procs, []))
    else:
        for target in (baseline, canary):
            procs, skipped, error = load_folder(target)
            if error:
                err(f"canary: {error}")
                return EXIT_NO_DATA
            for msg in skipped:
                err(f"canary: skipped {msg}")
            groups.append((target, procs, skipped))
    result = _canary.judge(groups[0][1], groups[1][1], _thresholds(args))
    for side, (source, _procs, skipped) in zip(("baseline", "canary"), groups):
        result[side].update({"source": source, "skipped": skipped})
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_result(result, args.top, Style(use_colour(sys.stdout))))
    return EXIT_OK if result["verdict"] == _canary.PASS else EXIT_FAIL


def register(sub: Any) -> None:
    """Add the ``canary`` command to the parser's subcommands."""
    th = _canary.Thresholds()
    can = sub.add_parser(
        "canary", help="judge a canary group against a baseline group per call site (a rollout gate)",
        description="Compare a canary group of processes with a baseline group per call site: live clients, "
                    "growth (a steady rise in the canary while the baseline is flat fails: the slow leak), "
                    "churn, clients left to the garbage collector, fd utilisation; a rank test across processes "
                    "plus an effect-size tolerance. Groups are snapshot folders, or label selectors with "
                    "--prometheus URL. Exit 0 pass, 1 fail, 2 bad input.")
    can.add_argument("baseline_pos", nargs="?", metavar="BASELINE", help="baseline snapshot folder (or file)")
    can.add_argument("canary_pos", nargs="?", metavar="CANARY", help="canary snapshot folder (or file)")
    can.add_argument("--baseline", metavar="GROUP", help="the baseline: a folder, or a selector with --prometheus")
    can.add_argument("--canary", metavar="GROUP", help="the canary: a folder, or a selector with --prometheus")
    can.add_argument("--prometheus", metavar="URL", help="read the groups from this Prometheus server")
    can.add_argument("--window", default="30m", metavar="D", help="with --prometheus: the time judged (30m)")
    can.add_argument("--step", default="30s", metavar="D", help="with --prometheus: the resolution (30s)")
    can.add_argument("--end", metavar="TIME", help="with --prometheus: the window's end, Unix seconds or ISO 8601 "
                                                   "(now)")
    can.add_argument("--timeout", type=float, default=30.0, metavar="S", help=argparse.SUPPRESS)
    can.add_argument("--alpha", type=float, default=th.alpha, metavar="P",
                     help=f"level of the one-sided rank test across processes ({th.alpha:g})")
    can.add_argument("--tolerance", type=float, default=th.tolerance, metavar="F",
                     help=f"allowed increase as a fraction of the baseline's mean ({th.tolerance:g})")
    can.add_argument("--min-shift", type=float, default=th.min_shift, metavar="N",
                     help=f"live clients per process always allowed on top ({th.min_shift:g})")
    can.add_argument("--min-growth", type=float, default=th.min_growth, metavar="R",
                     help=f"growth in clients per minute always allowed ({th.min_growth:g})")
    can.add_argument("--leak-share", type=float, default=th.leak_share, metavar="F",
                     help=f"share of canary processes growing steadily that makes a slow leak ({th.leak_share:g})")
    can.add_argument("--min-churn", type=float, default=th.min_churn, metavar="R",
                     help=f"clients created per minute always allowed on top ({th.min_churn:g})")
    can.add_argument("--min-gc", type=float, default=th.min_gc, metavar="R",
                     help=f"clients released by GC per minute always allowed on top ({th.min_gc:g})")
    can.add_argument("--min-fd", type=float, default=th.min_fd, metavar="F",
                     help=f"fd utilisation always allowed on top ({th.min_fd:g})")
    can.add_argument("--max-new", type=float, default=th.max_new, metavar="N",
                     help=f"live clients per process a call site new in the canary may hold ({th.max_new:g})")
    can.add_argument("--max-fd-utilization", type=float, metavar="F",
                     help="fail when a canary process uses more than this fraction of its fd limit")
    can.add_argument("--min-score", type=float, metavar="S", help="fail when the score (0-100) is under S")
    can.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    can.add_argument("--top", type=int, default=20, metavar="N", help="call sites to show (20; failures always)")
    can.set_defaults(func=main)
