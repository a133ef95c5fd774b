"""``connwatch report --html``: one self-contained HTML page from snapshot files.

Snapshots in, one HTML string out. The page carries its data (a compact JSON document), its
styles and its script inline, and a Content-Security-Policy that allows nothing else, so it
opens from disk, offline, in any browser, and never reaches the network. The picture is drawn by
the page's own small script (``report_page.js``: plain DOM for the flame graph, SVG for the
charts); no third-party code is vendored.

The data: strings (paths, functions, kinds, upstreams) and frames ``[file, line, function]``
are interned once for the whole page; each call site refers to its frames by index, its
traceback outermost first (the snapshot keeps it innermost first: the call site's own frame,
then its callers). A process is every snapshot file of one (host, pid, start time) in the
folder: the newest file gives the counts, all of them give the time series (each file's window
of ``samples`` plus its own reading).

Stdlib only.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .._snapshot import Snapshot, Statistic
from ._render import process_state

__all__ = ["histories", "page_data", "render"]

_HERE = os.path.dirname(os.path.abspath(__file__))
MERGE_S = 0.02  # readings of one series closer than this (s) are the same sample seen twice
ARGV_CHARS = 300
MAX_RETAINERS = 5  # paths shown per call site (snapshots taken with retainers carry a few)

History = List[Tuple[str, Snapshot]]  # one process's snapshot files, oldest first
SiteKey = Tuple[str, Optional[str], str, int, str]


def histories(snaps: Iterable[Tuple[str, Snapshot]]) -> List[History]:
    """Group snapshot files by process (host, pid, start time), each group oldest first.

    Groups come biggest first (live clients in their newest file), then by pid.
    """
    groups: Dict[Tuple[str, int, Optional[float]], History] = {}
    for path, snap in snaps:
        start = None if snap.started is None else round(snap.started, 1)
        groups.setdefault((snap.host, snap.pid, start), []).append((path, snap))
    out = [sorted(g, key=lambda ps: (ps[1].time, ps[1].final)) for g in groups.values()]
    out.sort(key=lambda g: (-g[-1][1].live, g[-1][1].pid))
    return out


def _key(s: Statistic) -> SiteKey:
    site = s.site
    return (s.kind, s.role, site.file if site else "?", site.line if site else 0, site.function if site else "?")


def _merge(points: Iterable[Tuple[float, int]]) -> List[Tuple[float, int]]:
    """Sorted readings, one per moment: a sample seen in two files (or a file's own reading) once."""
    out: List[Tuple[float, int]] = []
    for t, v in sorted(points):
        if out and t - out[-1][0] < MERGE_S:
            out[-1] = (t, v)
        else:
            out.append((t, v))
    return out


class _Interner:
    def __init__(self) -> None:
        self.strings: List[str] = []
        self._strings: Dict[str, int] = {}
        self.frames: List[Tuple[int, int, int]] = []
        self._frames: Dict[Tuple[str, int, str], int] = {}

    def s(self, text: str) -> int:
        i = self._strings.get(text)
        if i is None:
            i = self._strings[text] = len(self.strings)
            self.strings.append(text)
        return i

    def frame(self, file: str, line: int, function: str) -> int:
        k = (file, line, function)
        i = self._frames.get(k)
        if i is None:
            i = self._frames[k] = len(self.frames)
            self.frames.append((self.s(file), line, self.s(function)))
        return i


def _flat(points: Sequence[Tuple[float, int]], t0: float) -> List[float]:
    out: List[float] = []
    for t, v in points:
        out.append(round(t - t0, 2))
        out.append(v)
    return out


def _process(hist: History, t0: float, intern: _Interner) -> Dict[str, Any]:
    path, snap = hist[-1]
    # Series: every file's window of samples, plus the file's own reading at its time.
    series: Dict[SiteKey, List[Tuple[float, int]]] = {}
    fd_series: List[Tuple[float, int]] = []
    for _p, s in hist:
        for st in s.stats:
            pts = series.setdefault(_key(st), [])
            pts.extend(st.samples)
            pts.append((s.time, st.live))
        for pair in s.extra.get("fd_samples") or ():
            try:
                fd_series.append((float(pair[0]), int(pair[1])))
            except (TypeError, ValueError, IndexError):
                continue
        if s.fds_open is not None:
            fd_series.append((s.time, s.fds_open))
    totals: Dict[float, int] = {}
    sites = []
    for st in snap.statistics("callsite"):
        site = st.site
        if site is None:
            continue
        own = intern.frame(site.file, site.line, site.function)
        # The snapshot's traceback is innermost first; the page wants the outermost first.
        tb = [intern.frame(f, ln, fn) for f, ln, fn in reversed(site.traceback)]
        if not tb or tb[-1] != own:
            tb.append(own)
        pts = _merge(series.get(_key(st), ()))
        for t, v in pts:
            totals[t] = totals.get(t, 0) + v
        row: Dict[str, Any] = {
            "k": intern.s(st.label()), "f": own, "tb": tb, "l": st.live, "c": st.created, "x": st.closed,
            "g": st.gc_released, "a": None if st.oldest_age_s is None else round(st.oldest_age_s, 1),
            "u": [[intern.s(u), n] for u, n in sorted(st.upstreams, key=lambda un: -un[1])],
            "s": _flat(pts, t0),
        }
        if site.library:
            row["lib"] = 1
        if st.growth is not None:
            row["lk"] = 1 if st.growth.suspected else 0
            row["gpm"] = round(st.growth.per_min, 2)
        churn = st.churn
        if churn is not None:
            row["ch"] = {"s": 1 if churn.suspected else 0, "cpm": round(churn.created_per_min, 2),
                         "life": None if churn.median_lifetime_s is None else round(churn.median_lifetime_s, 3)}
        if st.retainers:
            row["r"] = [str(r) for r in st.retainers[:MAX_RETAINERS]]
        sites.append(row)
    fdx = snap.extra.get("fd_exhaustion")
    exhaustion = None
    if isinstance(fdx, dict):
        exhaustion = {
            "eta": fdx.get("eta_s"), "rate": fdx.get("rate_per_s"), "window": fdx.get("window_s"),
            "drivers": [
                {"k": intern.s(f"{d.get('kind')}/{d['role']}" if d.get("role") else str(d.get("kind"))),
                 "f": intern.frame(str(d.get("file")), int(d.get("line") or 0), str(d.get("function"))),
                 "gpm": d.get("growth_per_min"), "share": d.get("share"), "lk": 1 if d.get("suspected_leak") else 0}
                for d in fdx.get("drivers") or () if isinstance(d, dict)
            ],
        }
    argv = " ".join(snap.argv)
    cap = snap.cap or {}
    return {
        "pid": snap.pid, "host": snap.host, "service": snap.service,
        "argv": argv if len(argv) <= ARGV_CHARS else argv[:ARGV_CHARS - 3] + "...",
        "state": process_state(snap), "t": round(snap.time - t0, 2),
        "up": None if snap.started is None else round(snap.time - snap.started, 1),
        "files": len(hist), "path": path,
        "fds": [snap.fds_open, snap.fds_limit],
        "tot": [snap.live, snap.created, snap.closed, snap.gc_released],
        "cap": {k: cap.get(k) for k in ("limit", "per_callsite", "per_upstream", "mode", "exceeded") if k in cap},
        "fdx": exhaustion,
        "fdS": _flat(_merge(fd_series), t0),
        "totS": _flat(sorted(totals.items()), t0),
        "sites": sites,
    }


def page_data(hists: Sequence[History], now: Optional[float] = None, source: str = "") -> Dict[str, Any]:
    """The page's JSON document for these processes (see the module docstring)."""
    now = time.time() if now is None else now
    from .. import __version__

    # Times in the page are seconds from the oldest file (earlier samples are negative).
    t0 = min((s.time for h in hists for _p, s in h), default=now)
    intern = _Interner()
    procs = [_process(h, t0, intern) for h in hists]
    return {"v": 1, "version": __version__, "now": round(now - t0, 2), "t0": t0, "source": source,
            "strings": intern.strings, "frames": intern.frames, "procs": procs}


def _asset(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read()


def _script_json(data: Any) -> str:
    # Inside <script type="application/json">: "</script>" or "<!--" in a path must not end it.
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# Nothing but what the page carries: no fetch, no image, font or script from anywhere.
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


def render(hists: Sequence[History], now: Optional[float] = None, source: str = "") -> str:
    """One self-contained HTML page showing these processes (from :func:`histories`)."""
    data = page_data(hists, now, source)
    title = "connwatch report"
    if len(hists) == 1:
        snap = hists[0][-1][1]
        title += f": pid {snap.pid}" + (f" ({snap.service})" if snap.service else "")
    elif hists:
        title += f": {len(hists)} processes"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_escape(title)}</title>\n<style>\n{_asset('report_page.css')}</style>\n</head>\n"
        "<body>\n<noscript>This page draws its report with JavaScript; `connwatch report` prints the same "
        "facts as text.</noscript>\n"
        f"<script id=\"cw-data\" type=\"application/json\">{_script_json(data)}</script>\n"
        f"<script>\n{_asset('report_page.js')}</script>\n</body></html>\n"
    )
