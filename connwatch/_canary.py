"""The canary judge: two groups of per-process readings per call site -> a verdict per site.

A rollout runs a few *canary* processes on the new version next to *baseline* processes on
the old one. For every call site (file, line, function, kind) the judge compares the groups
process by process on what connwatch measures there:

* live clients per process,
* growth of the live count per minute, and whether it rises *steadily* (the agent's
  ``suspected_leak``, or the same rule applied to a Prometheus series),
* clients created per minute (churn), when the readings carry it,
* clients released only by garbage collection per minute of uptime (``gc_released``),
* and, per process, the fd utilisation (open fds / their limit).

Each measure is compared the way Kayenta's Mann-Whitney classifier does it: a rank test
across processes (is the canary consistently higher?) *and* an effect size (is it higher by
more than a tolerance?). Both must hold for a failure, so noise (no consistent shift) and a
small consistent shift (one more client at a 12-client site) pass. A shift beyond the
tolerance that the test cannot confirm is ``marginal``: shown, not failed. When a group is
too small for the test ever to reach its level (1 process against 3, 2 against 2), the
effect size alone decides.

The slow leak is a rule of its own: a site that grows steadily in most canary processes
while the baseline is flat fails, even when the live counts are equal at the end of the
canary (a leak that has not yet moved the totals). A site new in the canary has no baseline:
it is judged on its own growth and size.

Pure functions over plain values, stdlib only: snapshot folders and Prometheus' HTTP API feed
the same judge.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ._snapshot import SnapshotError, from_dict

__all__ = ["PASS", "MARGINAL", "FAIL", "Process", "Reading", "SiteKey", "Thresholds", "judge",
           "mann_whitney", "process_from_snapshot"]

PASS, MARGINAL, FAIL = "pass", "marginal", "fail"
_RANK = {PASS: 0, MARGINAL: 1, FAIL: 2}
_POINTS = {PASS: 1.0, MARGINAL: 0.5, FAIL: 0.0}

SiteKey = Tuple[str, int, str, str]  # (file, line, function, kind)

EXACT_MAX = 14  # pooled processes up to which the rank test's p-value is exact (ties included)


class Reading(NamedTuple):
    """What one process shows at one call site (None: not measured)."""

    live: float
    growth_per_min: Optional[float] = None
    steady: Optional[bool] = None  # the live count rises steadily (suspected_leak)
    created_per_min: Optional[float] = None
    churning: Optional[bool] = None  # suspected_churn
    gc_released_per_min: Optional[float] = None


@dataclass
class Process:
    """One process of a group: its readings per call site and its fd utilisation."""

    name: str
    sites: Dict[SiteKey, Reading]
    fd_utilization: Optional[float] = None


@dataclass(frozen=True)
class Thresholds:
    """The judge's settings (each is a ``connwatch canary`` flag)."""

    alpha: float = 0.05  # one-sided level of the rank test
    tolerance: float = 0.25  # allowed increase, as a fraction of the baseline's mean
    min_shift: float = 2.0  # live clients per process always allowed on top
    min_growth: float = 1.0  # clients per minute of growth always allowed
    leak_share: float = 0.5  # share of canary processes growing steadily that makes a slow leak
    min_churn: float = 10.0  # clients created per minute always allowed on top
    min_gc: float = 1.0  # clients released by GC per minute always allowed on top
    min_fd: float = 0.05  # fd utilisation always allowed on top (5 points)
    max_new: float = 20.0  # live clients per process a site new in the canary may hold
    max_fd_utilization: Optional[float] = None  # the canary's fd utilisation must stay under this
    min_score: Optional[float] = None  # overall score under this fails


# --- the rank test ------------------------------------------------------------------------------

def _ranks(values: Sequence[float]) -> Tuple[List[float], List[int]]:
    """Average ranks (1-based, in the order of ``values``) and the sizes of tied groups."""
    n = len(values)
    order = sorted(range(n), key=values.__getitem__)
    ranks = [0.0] * n
    ties: List[int] = []
    i = 0
    while i < n:
        j = i
        v = values[order[i]]
        while j + 1 < n and values[order[j + 1]] == v:
            j += 1
        r = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            ranks[order[k]] = r
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


_EXACT_CACHE: Dict[Tuple[Tuple[int, ...], int], List[int]] = {}


def _sum_counts(doubled: Tuple[int, ...], k: int) -> List[int]:
    """How many k-subsets of ``doubled`` (ranks x 2) have each sum: the test's null distribution."""
    key = (doubled, k)
    got = _EXACT_CACHE.get(key)
    if got is not None:
        return got
    total = sum(doubled)
    counts = [[0] * (total + 1) for _ in range(k + 1)]
    counts[0][0] = 1
    seen = 0
    for r in doubled:
        seen += r
        for size in range(k, 0, -1):
            src, dst = counts[size - 1], counts[size]
            for s in range(seen - r, -1, -1):
                c = src[s]
                if c:
                    dst[s + r] += c
    if len(_EXACT_CACHE) > 4096:
        _EXACT_CACHE.clear()
    _EXACT_CACHE[key] = counts[k]
    return counts[k]


def mann_whitney(baseline: Sequence[float], canary: Sequence[float]) -> Tuple[float, float]:
    """The Mann-Whitney U of ``canary`` and the one-sided p-value that it tends to be larger.

    Ties get average ranks. Up to :data:`EXACT_MAX` pooled values the p-value is exact (the
    permutation distribution of the tied ranks themselves); above, the normal approximation
    with the tie correction of the variance and a continuity correction. p is 1.0 when every
    value is the same.
    """
    n1, n2 = len(baseline), len(canary)
    if not n1 or not n2:
        return 0.0, 1.0
    pooled = [*baseline, *canary]
    ranks, ties = _ranks(pooled)
    r2 = sum(ranks[n1:])
    u2 = r2 - n2 * (n2 + 1) / 2.0
    n = n1 + n2
    if ties and ties[0] == n:
        return u2, 1.0
    if n <= EXACT_MAX:
        doubled = tuple(sorted(round(2 * r) for r in ranks))
        counts = _sum_counts(doubled, n2)
        obs = round(2 * r2)
        return u2, sum(counts[obs:]) / math.comb(n, n2)
    mu = n1 * n2 / 2.0
    tie_term = sum(t * t * t - t for t in ties)
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    if var <= 0.0:
        return u2, 1.0
    z = (u2 - mu - 0.5) / math.sqrt(var)
    return u2, 0.5 * math.erfc(z / math.sqrt(2.0))


def _can_decide(n1: int, n2: int, alpha: float) -> bool:
    """Whether the test can reach ``alpha`` at all: complete separation has p = 1/C(n1+n2, n2)."""
    return n1 > 0 and n2 > 0 and 1.0 / math.comb(n1 + n2, n2) <= alpha + 1e-12


# --- comparing one measure ------------------------------------------------------------------------

class _Cmp(NamedTuple):
    result: str  # "same" | "higher" | "uncertain"
    base: float  # means
    can: float
    shift: float
    tolerance: float
    p: Optional[float]
    decided_by_size: bool  # the groups were too small for the rank test


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _compare(base: Sequence[float], can: Sequence[float], floor: float, th: Thresholds) -> _Cmp:
    """Canary higher than baseline? Rank test and effect size (mean shift over a tolerance)."""
    mb, mc = _mean(base), _mean(can)
    shift = mc - mb
    tol = max(floor, th.tolerance * abs(mb))
    if shift <= tol:
        return _Cmp("same", mb, mc, shift, tol, None, False)
    p = mann_whitney(base, can)[1]
    if not _can_decide(len(base), len(can), th.alpha):
        return _Cmp("higher", mb, mc, shift, tol, p, True)
    return _Cmp("higher" if p <= th.alpha + 1e-12 else "uncertain", mb, mc, shift, tol, p, False)


def _num(x: Optional[float]) -> Any:
    if x is None:
        return None
    r = round(float(x), 3)
    return int(r) if r.is_integer() else r


def _g(x: float) -> str:
    r = round(x, 2)
    return f"{int(r)}" if float(r).is_integer() else f"{r:g}"


def _test_text(c: _Cmp) -> str:
    if c.decided_by_size:
        return "too few processes for the rank test: judged on the shift alone"
    return f"rank test p={c.p:.3g}" if c.p is not None else ""


def _figures(values: Sequence[float]) -> Optional[Dict[str, Any]]:
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0
    return {"mean": _num(sum(s) / n), "median": _num(med), "max": _num(s[-1])}


# --- the judge ----------------------------------------------------------------------------------

class _Side:
    """One group's readings at one site: per-process value lists (0 where the site is absent)."""

    __slots__ = ("churning", "created", "gc", "growth", "live", "n", "present", "steady")

    def __init__(self, readings: List[Reading], n: int) -> None:
        absent = n - len(readings)
        zeros = [0.0] * absent
        self.n = n
        self.present = len(readings)
        self.live = [r.live for r in readings] + zeros
        # A process without the site was flat at zero there; a reading without a measure is unknown.
        self.growth = [r.growth_per_min for r in readings if r.growth_per_min is not None] + zeros
        self.steady = sum(1 for r in readings if r.steady)
        self.created = [r.created_per_min for r in readings if r.created_per_min is not None]
        self.churning = sum(1 for r in readings if r.churning)
        self.gc = [r.gc_released_per_min for r in readings if r.gc_released_per_min is not None]
        if self.created:
            self.created += zeros
        if self.gc:
            self.gc += zeros

    def to_dict(self) -> Dict[str, Any]:
        return {
            "processes": self.n, "with_site": self.present,
            "live": _figures(self.live),
            "growth_per_min": _figures(self.growth) if self.present and len(self.growth) > self.n - self.present
            else None,
            "steady_growth": self.steady,
            "created_per_min": _figures(self.created),
            "churning": self.churning,
            "gc_released_per_min": _figures(self.gc),
        }


def _judge_new(c: _Side, th: Thresholds) -> Tuple[str, str]:
    live = _mean(c.live)
    growth = _mean(c.growth)
    share = c.steady / c.n if c.n else 0.0
    if share >= th.leak_share and growth > th.min_growth:
        return FAIL, (f"new in the canary and grows steadily ({c.steady} of {c.n} processes, "
                      f"{_g(growth)}/min per process): a leak")
    if live > th.max_new:
        return FAIL, (f"new in the canary with {_g(live)} live clients per process "
                      f"(more than --max-new {_g(th.max_new)})")
    created = _mean(c.created) if c.created else 0.0
    if c.churning and c.churning / c.n >= th.leak_share and created > th.min_churn:
        # Closed clients hold nothing, but a client built per call is a handshake per call for
        # the upstream: the seed's first remedy (one shared client) is what the canary broke.
        return FAIL, (f"new in the canary and builds a client per call: {_g(created)} created/min per process, "
                      f"churning in {c.churning} of {c.n} processes (more than --min-churn {_g(th.min_churn)})")
    if c.churning:
        return MARGINAL, (f"new in the canary; builds short-lived clients in {c.churning} of {c.n} processes "
                          f"({_g(created)} created/min per process)")
    if c.steady:
        return MARGINAL, (f"new in the canary; grows steadily in {c.steady} of {c.n} processes "
                          f"({_g(growth)}/min per process)")
    return PASS, f"new in the canary: {_g(live)} live clients per process, not growing"


def _judge_site(b: _Side, c: _Side, th: Thresholds) -> Tuple[str, List[str], Dict[str, Any]]:
    """(verdict, reasons worst first, the tests' figures) for a site both groups know."""
    verdict = PASS
    reasons: List[Tuple[int, str]] = []
    tests: Dict[str, Any] = {}

    def note(level: str, text: str) -> None:
        nonlocal verdict
        if _RANK[level] > _RANK[verdict]:
            verdict = level
        reasons.append((_RANK[level], text))

    def record(name: str, cmp: _Cmp) -> None:
        tests[name] = {"result": cmp.result, "shift": _num(cmp.shift), "tolerance": _num(cmp.tolerance),
                       "p": None if cmp.p is None else round(cmp.p, 4)}

    live = _compare(b.live, c.live, th.min_shift, th)
    record("live", live)
    live_text = f"live clients per process {_g(live.base)} -> {_g(live.can)}"
    if live.result == "higher":
        note(FAIL, f"{live_text} (+{_g(live.shift)}, over the tolerance {_g(live.tolerance)}; {_test_text(live)})")
    elif live.result == "uncertain":
        note(MARGINAL, f"{live_text} (+{_g(live.shift)}, over the tolerance {_g(live.tolerance)}, "
                       f"but not in most processes: {_test_text(live)})")

    # Growth, and the slow leak: steady growth in the canary while the baseline is flat.
    if len(c.growth) > c.n - c.present or len(b.growth) > b.n - b.present:
        growth = _compare(b.growth, c.growth, th.min_growth, th)
        record("growth_per_min", growth)
        share_c = c.steady / c.n
        share_b = b.steady / b.n
        steady_c = share_c >= th.leak_share
        if steady_c and share_b < th.leak_share and growth.shift > growth.tolerance:
            note(FAIL, f"grows steadily in the canary ({c.steady} of {c.n} processes, {_g(growth.can)}/min per "
                       f"process) while flat in the baseline ({b.steady} of {b.n}, {_g(growth.base)}/min): "
                       f"a slow leak, whatever the live counts ({_g(live.base)} -> {_g(live.can)})")
        elif steady_c and growth.result == "higher":
            note(FAIL, f"grows faster in the canary: {_g(growth.base)} -> {_g(growth.can)}/min per process "
                       f"(over the tolerance {_g(growth.tolerance)}; {_test_text(growth)})")
        elif growth.result != "same":
            note(MARGINAL, f"grows faster in the canary, but not steadily: {_g(growth.base)} -> "
                           f"{_g(growth.can)}/min per process ({c.steady} of {c.n} processes steady)")
        elif c.steady and not b.steady:
            note(MARGINAL, f"grows steadily in {c.steady} of {c.n} canary processes (none in the baseline)")

    if c.created and b.created:
        churn = _compare(b.created, c.created, th.min_churn, th)
        record("created_per_min", churn)
        if churn.result != "same":
            text = (f"creates more clients: {_g(churn.base)} -> {_g(churn.can)}/min per process "
                    f"(+{_g(churn.shift)}, over the tolerance {_g(churn.tolerance)}; {_test_text(churn)}; "
                    f"churning in {c.churning} of {c.n} canary processes, {b.churning} of {b.n} baseline)")
            note(FAIL if churn.result == "higher" else MARGINAL, text)

    if c.gc and b.gc:
        gc = _compare(b.gc, c.gc, th.min_gc, th)
        record("gc_released_per_min", gc)
        if gc.result != "same":
            note(FAIL if gc.result == "higher" else MARGINAL,
                 f"more clients left to the garbage collector (never closed): {_g(gc.base)} -> {_g(gc.can)}/min "
                 f"per process (over the tolerance {_g(gc.tolerance)}; {_test_text(gc)})")

    if not reasons:
        text = f"{live_text}, within the tolerance {_g(live.tolerance)}"
        if "growth_per_min" in tests:
            text += f"; growth {_g(_mean(b.growth))} -> {_g(_mean(c.growth))}/min"
        reasons.append((0, text))
    reasons.sort(key=lambda r: -r[0])
    return verdict, [r[1] for r in reasons], tests


def _judge_fds(base: Sequence[Process], can: Sequence[Process], th: Thresholds) -> Optional[Dict[str, Any]]:
    b = [p.fd_utilization for p in base if p.fd_utilization is not None]
    c = [p.fd_utilization for p in can if p.fd_utilization is not None]
    if not c:
        return None
    verdict, reason = PASS, ""
    test = None
    if b:
        cmp = _compare(b, c, th.min_fd, th)
        test = {"result": cmp.result, "shift": _num(cmp.shift), "tolerance": _num(cmp.tolerance),
                "p": None if cmp.p is None else round(cmp.p, 4)}
        text = f"fd utilisation {cmp.base:.1%} -> {cmp.can:.1%} per process"
        if cmp.result == "higher":
            verdict, reason = FAIL, f"{text} (over the tolerance {cmp.tolerance:.1%}; {_test_text(cmp)})"
        elif cmp.result == "uncertain":
            verdict, reason = MARGINAL, f"{text} (over the tolerance {cmp.tolerance:.1%}, not in most processes)"
        else:
            reason = f"{text}, within the tolerance {cmp.tolerance:.1%}"
    else:
        reason = f"fd utilisation {_mean(c):.1%} per canary process (no baseline reading)"
    if th.max_fd_utilization is not None and max(c) > th.max_fd_utilization:
        verdict = FAIL
        reason = (f"a canary process uses {max(c):.1%} of its fd limit (more than --max-fd-utilization "
                  f"{th.max_fd_utilization:.0%}); " + reason)
    return {"verdict": verdict, "reason": reason,
            "baseline": _figures(b), "canary": _figures(c), "test": test}


def judge(baseline: Sequence[Process], canary: Sequence[Process], thresholds: Optional[Thresholds] = None
          ) -> Dict[str, Any]:
    """Judge the canary group against the baseline group; returns the JSON-ready result.

    ``{"verdict": "pass"|"fail", "score": 0..100, "sites": [...], "fds": {...}|None, ...}``: one
    entry per call site of either group, failures first, each with its ``verdict``
    (``pass``/``marginal``/``fail``), ``reason`` in words and the figures of both groups. The
    canary fails when any site (or the fd utilisation) fails, or when the score (100 x the
    share of passing sites, a marginal one counting half) is under ``min_score``.
    """
    th = thresholds or Thresholds()
    nb, nc = len(baseline), len(canary)
    if not nb or not nc:
        raise ValueError("both groups need at least one process")
    per_b: Dict[SiteKey, List[Reading]] = {}
    per_c: Dict[SiteKey, List[Reading]] = {}
    for procs, per in ((baseline, per_b), (canary, per_c)):
        for proc in procs:
            for key, reading in proc.sites.items():
                got = per.get(key)
                if got is None:
                    per[key] = [reading]
                else:
                    got.append(reading)
    keys = list(per_c) + [k for k in per_b if k not in per_c]
    sites: List[Dict[str, Any]] = []
    order: List[Tuple[Any, ...]] = []
    points = 0.0
    counts = {PASS: 0, MARGINAL: 0, FAIL: 0}
    for key in keys:
        b = _Side(per_b.get(key, []), nb)
        c = _Side(per_c.get(key, []), nc)
        tests: Dict[str, Any] = {}
        if not b.present:
            verdict, reason = _judge_new(c, th)
            reasons = [reason]
            status = "new"
        elif not c.present:
            verdict, reasons, status = PASS, ["gone in the canary"], "gone"
        else:
            verdict, reasons, tests = _judge_site(b, c, th)
            status = "both"
        counts[verdict] += 1
        points += _POINTS[verdict]
        sites.append({
            "file": key[0], "line": key[1], "function": key[2], "kind": key[3],
            "verdict": verdict, "reason": "; ".join(reasons), "site": status,
            "baseline": b.to_dict(), "canary": c.to_dict(), "tests": tests,
        })
        order.append((-_RANK[verdict], -abs(_mean(c.live) - _mean(b.live)), key[0], key[1], len(order)))
    fds = _judge_fds(baseline, canary, th)
    items = len(sites) + (1 if fds else 0)
    if fds:
        counts[fds["verdict"]] += 1
        points += _POINTS[fds["verdict"]]
    score = round(100.0 * points / items, 2) if items else 100.0
    sites = [sites[o[-1]] for o in sorted(order)]
    failed = counts[FAIL] > 0 or (th.min_score is not None and score < th.min_score)
    if counts[FAIL]:
        summary = f"{counts[FAIL]} of {items} checks failed"
    elif failed:
        summary = f"score {score:g} is under --min-score {th.min_score:g}"
    else:
        summary = f"no call site failed ({counts[MARGINAL]} marginal)"
    return {
        "verdict": FAIL if failed else PASS, "score": score, "summary": summary,
        "counts": counts, "thresholds": asdict(th),
        "baseline": {"processes": nb, "names": [p.name for p in baseline]},
        "canary": {"processes": nc, "names": [p.name for p in canary]},
        "fds": fds, "sites": sites,
    }


# --- readings from snapshot files -----------------------------------------------------------------

def _merge(a: Reading, b: Reading) -> Reading:
    def add(x: Optional[float], y: Optional[float]) -> Optional[float]:
        return y if x is None else x if y is None else x + y

    return Reading(a.live + b.live, add(a.growth_per_min, b.growth_per_min), (a.steady or b.steady) or None,
                   add(a.created_per_min, b.created_per_min), (a.churning or b.churning) or None,
                   add(a.gc_released_per_min, b.gc_released_per_min))


_new = tuple.__new__


def process_from_snapshot(data: Mapping[str, Any], source: str = "<snapshot>") -> Process:
    """The readings of one snapshot file's JSON object; raises SnapshotError when it is not one.

    The file-level contract is checked by ``_snapshot.from_dict`` (as ``diff`` and ``report``
    check it); the call-site rows by the same rules, read straight into readings (building
    every row's CallSite and Statistic would cost more than judging them). Roles of a socket
    site are summed (Prometheus' series have no role). Growth counts only when the agent had
    two samples or more; churn comes from ``churn.created_per_min`` and ``suspected_churn``
    when the snapshot has them; ``gc_released`` is per minute of uptime.
    """
    rows = data.get("callsites")
    snap = from_dict({**data, "callsites": []} if isinstance(rows, list) else data, source)
    assert isinstance(rows, list)
    uptime_min = None
    if snap.started is not None and snap.time > snap.started:
        uptime_min = (snap.time - snap.started) / 60.0
    sites: Dict[SiteKey, Reading] = {}
    try:
        for row in rows:
            key = (str(row["file"]), int(row["line"]), str(row["function"]), str(row["kind"]))
            live = int(row["live"])
            int(row["created"])
            growth = steady = None
            leak = row.get("suspected_leak")
            if isinstance(leak, bool) and int(row.get("growth_samples") or 0) >= 2:
                growth, steady = float(row.get("growth_per_min") or 0.0), leak
            created = churning = None
            churn = row.get("churn")
            if isinstance(churn, dict) and isinstance(churn.get("created_per_min"), (int, float)):
                created = float(churn["created_per_min"])
            if isinstance(row.get("suspected_churn"), bool):
                churning = row["suspected_churn"]
            gc = int(row.get("gc_released") or 0) / uptime_min if uptime_min else None
            reading = _new(Reading, (float(live), growth, steady, created, churning, gc))  # no Python __new__
            prev = sites.get(key)
            sites[key] = reading if prev is None else _merge(prev, reading)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SnapshotError(f"{source}: not a valid connwatch snapshot (bad call site row: {e!r})") from None
    fd = snap.fds_open / snap.fds_limit if snap.fds_open is not None and snap.fds_limit else None
    return Process(f"{snap.host}-{snap.pid}", sites, fd)
