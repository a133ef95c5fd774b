"""Canary readings from Prometheus: the agents' series per instance over a window.

``connwatch canary --prometheus URL --baseline SELECTOR --canary SELECTOR`` reads, through the
HTTP API's ``/api/v1/query_range``, the series the agent's exporter serves
(``CONNWATCH_EXPORTER=prometheus``, connwatch/exporters/prometheus.py) for the instances that
match each selector, and turns them into the judge's per-process readings (``_canary``):

* live clients per call site: the last value of ``connwatch_clients_live`` (summed over the
  upstream series of a site), its growth per minute the least-squares slope over the window,
  and *steady* when the series, taken at :data:`_leaks.WINDOW` points across the window,
  passes the agent's own leak rule (``_leaks.assess``);
* clients created per minute: the increase of ``connwatch_clients_created_total`` over the
  window (counter resets counted as restarts, as Prometheus' ``increase`` does);
* churning (a client built per call): over the window the site made at least
  ``_leaks.CHURN_MIN_CREATED`` clients at ``CHURN_MIN_RATE``/min or more, and of the clients it
  released then (created minus the rise in live), ``CHURN_MIN_RELEASED`` or more and at least half
  were short-lived (``connwatch_clients_short_lived_total``: released within 10 s): the snapshot's
  rule, with "median lifetime under 10 s" read as "half or more released within 10 s". Agents
  without that series leave it unknown;
* fd utilisation: the last value of ``connwatch_fd_utilization``.

Clients released by the garbage collector are not exported: that measure is judged only from
snapshot folders. One process is one (job, instance) pair. Stdlib only (urllib.request).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Optional, Sequence, Tuple

from . import _leaks
from ._canary import Process, Reading, SiteKey

__all__ = ["MAX_POINTS", "PromError", "parse_duration", "parse_time", "query_range", "read_group", "selector"]

MAX_POINTS = 11000  # Prometheus refuses a range query with more points per series than this
SITE_LABELS = ("connwatch_client_kind", "code_file_path", "code_line_number", "code_function_name")
PROCESS_LABELS = ("job", "instance")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}

Series = Tuple[Dict[str, str], List[Tuple[float, float]]]


class PromError(Exception):
    """Prometheus could not be asked, or said no: the message says which and why."""


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus-style duration (``30s``, ``5m``, ``1h30m``, ``500ms``) or a number."""
    raw = text.strip()
    try:
        value = float(raw)
    except ValueError:
        pos, value = 0, 0.0
        for m in _DURATION.finditer(raw):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(raw) or not raw:
            raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"not a positive duration: {text!r}")
    return value


def parse_time(text: str) -> float:
    """Unix seconds from ``1764150000``/``1764150000.5`` or ISO 8601 (``2026-12-03T09:30:00Z``)."""
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    import datetime

    try:
        when = datetime.datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use Unix seconds or ISO 8601, e.g. 2026-12-03T09:30:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def selector(text: str) -> str:
    """Label matchers ``a="b",c=~"d"`` (braces optional) as the inside of ``{...}``."""
    s = text.strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    if not s or "{" in s or "}" in s:
        raise ValueError(f"not a label selector: {text!r} (use e.g. 'job=\"api\",track=\"canary\"')")
    return s


def query_range(url: str, query: str, start: float, end: float, step: float, timeout: float = 30.0
                ) -> List[Series]:
    """Run ``query`` over [start, end] every ``step`` seconds; returns (labels, [(t, v)]) per series."""
    params = urllib.parse.urlencode({"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                     "step": f"{step:g}"})
    full = url.rstrip("/") + "/api/v1/query_range?" + params
    try:
        with urllib.request.urlopen(full, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error") or e.reason
        except Exception:
            detail = e.reason
        raise PromError(f"Prometheus at {url} refused the query {query!r}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PromError(f"cannot reach Prometheus at {url}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise PromError(f"{url} did not answer like Prometheus (not JSON): is this the server's address?") from None
    if not isinstance(data, dict) or data.get("status") != "success":
        detail = data.get("error") if isinstance(data, dict) else None
        raise PromError(f"Prometheus at {url} failed the query {query!r}: {detail or 'no success status'}")
    result = (data.get("data") or {}).get("result")
    if not isinstance(result, list):
        raise PromError(f"Prometheus at {url} gave no range result for {query!r}")
    out: List[Series] = []
    for item in result:
        try:
            labels = {str(k): str(v) for k, v in (item.get("metric") or {}).items()}
            points = [(float(t), float(v)) for t, v in item.get("values") or ()]
        except (AttributeError, TypeError, ValueError):
            raise PromError(f"Prometheus at {url} gave a malformed series for {query!r}") from None
        out.append((labels, [(t, v) for t, v in points if not math.isnan(v)]))
    return out


def _process(labels: Dict[str, str]) -> str:
    return "/".join(labels.get(k, "") for k in PROCESS_LABELS)


def _site(labels: Dict[str, str]) -> Optional[SiteKey]:
    try:
        line = int(float(labels.get("code_line_number", "0")))
    except ValueError:
        line = 0
    kind = labels.get("connwatch_client_kind")
    if kind is None:
        return None
    return (labels.get("code_file_path", "?"), line, labels.get("code_function_name", "?"), kind)


def _spread(points: Sequence[_leaks.Point], n: int) -> List[_leaks.Point]:
    """``n`` points across the series' time span (the last point of each of n equal slices)."""
    if len(points) <= n:
        return list(points)
    t0, t1 = points[0][0], points[-1][0]
    width = (t1 - t0) / n
    out: List[_leaks.Point] = []
    slot = 0
    for t, v in points:
        k = min(n - 1, int((t - t0) / width)) if width > 0 else n - 1
        if out and k == slot:
            out[-1] = (t, v)
        else:
            out.append((t, v))
            slot = k
    return out


def _increase(points: Sequence[Tuple[float, float]]) -> float:
    total, prev = 0.0, None
    for _t, v in points:
        if prev is not None:
            total += v - prev if v >= prev else v  # a reset: the process restarted from 0
        prev = v
    return total


def read_group(url: str, match: str, window_s: float, step_s: float, end: Optional[float] = None,
               timeout: float = 30.0) -> List[Process]:
    """The judge's per-process readings for the instances matching ``match`` (a selector)."""
    inner = selector(match)
    if window_s / step_s > MAX_POINTS:
        raise PromError(f"--window / --step gives {int(window_s / step_s)} points per series; Prometheus "
                        f"allows {MAX_POINTS}: use a larger --step")
    end = time.time() if end is None else end
    start = end - max(1, int(window_s / step_s)) * step_s  # a whole number of steps: ``end`` is evaluated
    by = ", ".join((*PROCESS_LABELS, *SITE_LABELS))
    live = query_range(url, f"sum by ({by}) (connwatch_clients_live{{{inner}}})", start, end, step_s, timeout)
    created = query_range(url, f"sum by ({by}) (connwatch_clients_created_total{{{inner}}})", start, end,
                          step_s, timeout)
    short = query_range(url, f"sum by ({by}) (connwatch_clients_short_lived_total{{{inner}}})", start, end,
                        step_s, timeout)
    fds = query_range(url, f"max by ({', '.join(PROCESS_LABELS)}) (connwatch_fd_utilization{{{inner}}})",
                      start, end, step_s, timeout)
    procs: Dict[str, Dict[SiteKey, Reading]] = {}
    fd_of: Dict[str, float] = {}
    rates: Dict[Tuple[str, SiteKey], Tuple[float, float]] = {}  # (created per minute, created)
    for labels, points in created:
        key = _site(labels)
        if key is None or len(points) < 2 or points[-1][0] <= points[0][0]:
            continue
        minutes = (points[-1][0] - points[0][0]) / 60.0
        made = _increase(points)
        rates[(_process(labels), key)] = (made / minutes, made)
    shorts: Dict[Tuple[str, SiteKey], float] = {}
    for labels, points in short:
        key = _site(labels)
        if key is not None and len(points) >= 2:
            shorts[(_process(labels), key)] = _increase(points)
    for labels, points in live:
        key = _site(labels)
        if key is None or not points:
            continue
        name = _process(labels)
        growth = steady = None
        if len(points) >= 2:
            counts = [(t, round(v)) for t, v in points]  # live counts are whole numbers
            growth = _leaks.slope(counts) * 60.0
            steady = _leaks.assess(_spread(counts, _leaks.WINDOW)).suspected
        rate = rates.get((name, key))
        churning = None
        if rate is not None and (name, key) in shorts:
            released = rate[1] - (points[-1][1] - points[0][1])  # made, less the rise in live
            quick = shorts[(name, key)]
            churning = (rate[1] >= _leaks.CHURN_MIN_CREATED and rate[0] >= _leaks.CHURN_MIN_RATE
                        and quick >= _leaks.CHURN_MIN_RELEASED and 2 * quick >= released)
        procs.setdefault(name, {})[key] = Reading(points[-1][1], growth, steady, None if rate is None else rate[0],
                                                  churning)
    for labels, points in fds:
        if points:
            name = _process(labels)
            fd_of[name] = points[-1][1]
            procs.setdefault(name, {})
    return [Process(name, procs[name], fd_of.get(name)) for name in sorted(procs)]
