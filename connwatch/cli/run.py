"""``connwatch run -- CMD``: run a command with the agent enabled."""

from __future__ import annotations

import argparse
import os
from typing import Any, List

from .. import _config
from ._render import EXIT_OK, EXIT_USAGE, err


def main(args: argparse.Namespace) -> int:
    cmd: List[str] = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        err("run: give the command to run after --, e.g. connwatch run -- python app.py")
        return EXIT_USAGE
    env = os.environ
    env[_config.ENABLED] = "1"
    settings = [
        (args.dir, _config.DIR), (args.interval, _config.SNAPSHOT_INTERVAL),
        (args.cap, _config.CAP), (args.cap_per_callsite, _config.CAP_PER_CALLSITE),
        (args.cap_per_upstream, _config.CAP_PER_UPSTREAM), (args.cap_mode, _config.CAP_MODE),
        (args.exporter, _config.EXPORTER), (args.service, _config.SERVICE),
        (args.disable_patches, _config.DISABLED_PATCHES),
        ("1" if args.retainers else None, _config.RETAINERS),
    ]
    for value, var in settings:
        if value is not None:
            env[var] = os.path.abspath(value) if var == _config.DIR else str(value)
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        err(f"run: command not found: {cmd[0]}")
        return 127
    except OSError as e:
        err(f"run: cannot run {cmd[0]}: {e.strerror or e}")
        return 126
    return EXIT_OK  # pragma: no cover - exec does not return


def register(sub: Any) -> None:
    """Add the ``run`` command to the parser's subcommands."""
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
    run.add_argument("--retainers", action="store_true",
                     help="write the retainers of suspected leaks into the snapshot files (CONNWATCH_RETAINERS)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS")
    run.set_defaults(func=main)
