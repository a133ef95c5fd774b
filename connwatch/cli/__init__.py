"""The ``connwatch`` command: one module per subcommand (run, report, top, diff, canary, doctor), the
shared terminal rendering in ``_render`` and snapshot loading in ``_load``.

Human output is coloured only on a terminal (and never with ``NO_COLOR``); ``--json`` gives
machines the same facts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import canary, diff, doctor, report, run, top
from ._render import EXIT_OK, EXIT_USAGE

COMMANDS = (run, report, top, diff, canary, doctor)


def _quiet_agent() -> None:
    # CONNWATCH_ENABLED in the shell starts the agent in this command too; its own snapshot
    # file would show up in the folder it reports on, so stop it and remove the file.
    from .. import bootstrap

    if not bootstrap.is_enabled():
        return
    path = bootstrap.snapshot_path()
    bootstrap.stop(final_write=False)
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``connwatch`` command."""
    parser = argparse.ArgumentParser(
        prog="connwatch", description="Find connection leaks: live network clients per call site."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``connwatch`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.func is not run.main:
        _quiet_agent()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
