"""Terminal rendering shared by the commands: exit codes, colour, and the small formatters
(ages, rates, call sites, fd lines) every report uses."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

from .._snapshot import Snapshot, Statistic

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_NO_DATA = 2


def err(msg: str) -> None:
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



def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def short(path: str, width: int = 60) -> str:
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


def rate_text(per_min: Optional[float]) -> str:
    if per_min is None:
        return "-"
    if abs(per_min) < 0.05:
        return "0/min"
    if abs(per_min) >= 100:
        return f"{per_min:+.0f}/min"
    return f"{per_min:+.1f}/min"


def site_text(file: str, line: int, function: str, width: int = 60) -> str:
    """``file:line (function)`` with the file shortened for a terminal."""
    return f"{short(file, width)}:{line} ({function})"


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
    win = f" over the last {age(window)}" if isinstance(window, (int, float)) and window > 0 else ""
    eta = fx.get("eta_s")
    if eta is None:
        return [f"fd exhaustion: not expected (open fds not rising{win})"]
    per_min = float(rate) * 60.0 if isinstance(rate, (int, float)) else 0.0
    out = [style.red(f"fd exhaustion: the fd limit is reached in ~{age(float(eta))}")
           + f" at the current rate ({per_min:+.1f} fds/min{win})"]
    drivers = fx.get("drivers")
    if isinstance(drivers, list):
        for d in drivers:
            if not isinstance(d, dict):
                continue
            try:
                where = site_text(str(d["file"]), int(d["line"]), str(d["function"]))
                kind = f"{d['kind']}/{d['role']}" if d.get("role") else str(d["kind"])
                out.append(f"  driven by {where} {kind} {rate_text(float(d['growth_per_min']))}")
            except (KeyError, TypeError, ValueError):
                continue
    return out


def churning(snap: Snapshot) -> List[Statistic]:
    """Call sites of the snapshot flagged as suspected churn (a client per call), fastest first."""
    out = [s for s in snap.stats if s.churn is not None and s.churn.suspected]
    return sorted(out, key=lambda s: -(s.churn.created_per_min if s.churn else 0.0))


def lifetime_text(seconds: Optional[float]) -> str:
    """A client lifetime: ``3.2ms``, ``1.5s``, ``2.0m``."""
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1000:.1f}ms"
    return age(seconds)


def churn_text(s: Statistic) -> str:
    """``churn: 540 created/min, median lifetime 3.1ms: <advice>`` for a churning call site."""
    from .._leaks import churn_advice

    c = s.churn
    if c is None:
        return ""
    return (f"churn: {c.created_per_min:.0f} created/min, median lifetime {lifetime_text(c.median_lifetime_s)} "
            f"({c.released} released): {churn_advice(s.kind, s.role)}")


def suspected(snap: Snapshot) -> List[Statistic]:
    """Call sites of the snapshot flagged as suspected leaks, fastest growth first."""
    out = [s for s in snap.stats if s.growth is not None and s.growth.suspected]
    return sorted(out, key=lambda s: -(s.growth.per_min if s.growth else 0.0))


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


def process_state(snap: Snapshot) -> str:
    """``exited`` (wrote its final snapshot), ``gone`` (no such pid here) or ``running``."""
    if snap.final:
        return "exited"
    return "running" if snap.host != host_name() or pid_alive(snap.pid) else "gone"


def host_name() -> str:
    from .._snapshot import hostname

    return hostname()
