"""The ``connwatch`` command: run, report (and later top, diff, doctor)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

from . import _config
from ._snapshot import Snapshot, SnapshotError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_DATA = 2


def _err(msg: str) -> None:
    print(f"connwatch: {msg}", file=sys.stderr)


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


def format_report(snap: Snapshot, top: int = 10, now: Optional[float] = None, path: str = "") -> str:
    """The human-readable report of one snapshot."""
    now = time.time() if now is None else now
    out: List[str] = []
    argv = " ".join(snap.argv) if snap.argv else "?"
    state = "exited" if snap.final else ("running" if snap.host != _host() or pid_alive(snap.pid) else "gone")
    service = f" service {snap.service}" if snap.service else ""
    out.append(f"pid {snap.pid} on {snap.host}{service} [{state}]: {argv}")
    out.append(f"  snapshot {_age(max(0.0, now - snap.time))} ago{(' (' + path + ')') if path else ''}")
    out.append(f"  {fd_line(snap)}")
    out.append(
        f"  clients: {snap.live} live, {snap.created} created, {snap.closed} closed"
        f" ({snap.gc_released} released only by garbage collection, never closed)"
    )
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
    out.append(f"  {'LIVE':>6} {'CREATED':>8} {'CLOSED':>7} {'GC':>5} {'OLDEST':>7}  {'KIND':<26} CALL SITE")
    for s in stats[:top]:
        site = s.site
        where = f"{_short(site.file)}:{site.line} ({site.function})" if site else "?"
        if site is not None and site.library:
            where += " [library: no app frame]"
        out.append(
            f"  {s.live:>6} {s.created:>8} {s.closed:>7} {s.gc_released:>5} {_age(s.oldest_age_s):>7}  "
            f"{s.label():<26} {where}"
        )
        if s.upstreams:
            ups = ", ".join(f"{u} ({n})" for u, n in sorted(s.upstreams, key=lambda x: -x[1])[:5])
            out.append(f"  {'':>38}  upstreams: {ups}")
        if site is not None and site.traceback and s.live:
            out.append(f"  {'':>38}  traceback (most recent call last):")
            for f, ln, fn in reversed(site.traceback):
                out.append(f"  {'':>38}    {_short(f)}:{ln} in {fn}")
    if len(stats) > top:
        out.append(f"  ... {len(stats) - top} more call sites (use --top N)")
    return "\n".join(out)


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
    print("\n\n".join(format_report(s, args.top, now, _short(p)) for p, s in good))
    return EXIT_OK


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``connwatch`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
