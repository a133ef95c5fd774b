"""Leak signals computed by the agent itself: growth over a window, fd exhaustion, in the
snapshot files of real processes and in ``connwatch report``."""

from __future__ import annotations

import json
from typing import Any, List, Tuple

from connwatch import _leaks

from .conftest import connwatch_cli, site_row, validate


def _series(values: List[int], dt: float = 1.0) -> List[Tuple[float, int]]:
    return [(i * dt, v) for i, v in enumerate(values)]


def test_window_rules_rise_plateau_noise() -> None:
    assert _leaks.assess(_series([1, 2, 3, 4, 5, 6, 7, 8])).suspected
    # A slow leak with flat steps between new clients is still a rising trend.
    assert _leaks.assess(_series([1, 1, 2, 2, 3, 3, 4, 4])).suspected
    # A pool that grew, then plateaued for half the window: not a leak.
    assert not _leaks.assess(_series([1, 3, 5, 5, 5, 5, 5, 5])).suspected
    # Busy but bounded: goes up and down.
    assert not _leaks.assess(_series([5, 3, 6, 4, 5, 3, 6, 4])).suspected
    # One sample, or too few, is never a leak; a rise of one client is noise.
    assert not _leaks.assess(_series([1, 50])).suspected
    assert not _leaks.assess(_series([1, 1, 1, 1, 1, 1, 1, 2])).suspected
    # Falling: not a leak, negative rate.
    g = _leaks.assess(_series([9, 8, 7, 6, 5, 4, 3, 2]))
    assert not g.suspected and g.per_min < 0
    g = _leaks.assess(_series([0, 2, 4, 6], dt=1.0))
    assert abs(g.per_min - 120.0) < 1e-6 and g.samples == 4 and g.window_s == 3.0


def test_fd_exhaustion_eta_and_drivers() -> None:
    key = ("socket", "client", "/app/a.py", 12, "f")
    growth = _leaks.assess(_series([10, 20, 30, 40]))
    fx = _leaks.fd_exhaustion(_series([100, 110, 120, 130]), 1130, [(key, growth)])
    assert fx["eta_s"] == 100.0 and fx["rate_per_s"] == 10.0
    assert fx["drivers"][0]["line"] == 12 and fx["drivers"][0]["share"] == 1.0
    flat = _leaks.fd_exhaustion(_series([100, 100, 100, 100]), 1130, [])
    assert flat["eta_s"] is None and flat["drivers"] == []


def _suspected(data: Any, function: str) -> bool:
    return bool(site_row(data, function).get("suspected_leak"))


def test_leak_flagged_pool_not(apps: Any, tcp_server: Any) -> None:
    leak = apps("leak", tcp_server.port)
    pool = apps("pool", tcp_server.port, "5")
    data = leak.wait_for(lambda d: any(r.get("suspected_leak") for r in d["callsites"]))
    validate(data)
    row = site_row(data, "connect_leaky")
    assert row["suspected_leak"] is True and row["growth_per_min"] > 60  # ~600/min: 10 per second
    assert row["growth_samples"] >= _leaks.MIN_SAMPLES
    fx = data["fd_exhaustion"]
    assert fx["eta_s"] is not None and fx["eta_s"] > 0 and fx["rate_per_s"] > 1
    assert fx["drivers"][0]["function"] == "connect_leaky"
    # The pool fills 5 connections in ~0.5 s, then stays: once the plateau fills the window,
    # it is not suspected, and fds are not expected to run out.
    data = pool.wait_for(lambda d: site_row(d, "connect_pooled")["live"] == 5
                         and site_row(d, "connect_pooled").get("growth_samples", 0) >= _leaks.WINDOW)
    data = pool.wait_for(lambda d: d["time"] > data["time"] + 2.0)
    validate(data)
    row = site_row(data, "connect_pooled")
    assert row["live"] == 5 and row["suspected_leak"] is False and row["growth_per_min"] == 0
    assert data["fd_exhaustion"]["eta_s"] is None
    # Meanwhile the leaking one is still flagged.
    assert _suspected(leak.snapshot(), "connect_leaky")


def test_churn_is_not_a_leak(apps: Any, tcp_server: Any) -> None:
    churn = apps("churn", tcp_server.port)
    data = churn.wait_for(lambda d: site_row(d, "connect_churn")["created"] > 40
                          and site_row(d, "connect_churn").get("growth_samples", 0) >= _leaks.WINDOW)
    row = site_row(data, "connect_churn")
    assert row["suspected_leak"] is False and row["live"] <= 1


def test_report_shows_leak_signals(apps: Any, tcp_server: Any) -> None:
    leak = apps("leak", tcp_server.port)
    leak.wait_for(lambda d: any(r.get("suspected_leak") for r in d["callsites"]))
    proc = connwatch_cli("report", str(leak.path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "suspected leaks: 1 call site" in out
    assert "fd exhaustion: the fd limit is reached in ~" in out
    assert "driven by" in out and "connect_leaky" in out
    line = next(ln for ln in out.splitlines() if "(connect_leaky)" in ln and "<< suspected leak" in ln)
    assert "/min" in line
    assert "\x1b[" not in out  # not a terminal: no colour
    proc = connwatch_cli("report", str(leak.path), "--json")
    data = json.loads(proc.stdout)
    assert site_row(data, "connect_leaky")["suspected_leak"] is True and "fd_exhaustion" in data


def test_final_snapshot_at_exit_keeps_signals(apps: Any, tcp_server: Any) -> None:
    leak = apps("leak", tcp_server.port)
    leak.wait_for(lambda d: any(r.get("suspected_leak") for r in d["callsites"]))
    assert leak.finish() == 0
    data = leak.snapshot()
    validate(data)
    assert data["final"] is True and site_row(data, "connect_leaky")["suspected_leak"] is True
