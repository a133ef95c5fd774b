"""The canary judge as pure functions: the rank test against a brute-force permutation test,
and the verdict rules (noise, a real shift, the slow leak, new and gone sites, churn, GC, fds,
small groups) over per-process readings; and the Prometheus reader's pure parts."""

from __future__ import annotations

import itertools
import random
from typing import Any, Dict, List, Optional, Sequence

import pytest

from connwatch import _canary, _promsource
from connwatch._canary import Process, Reading, Thresholds, judge, mann_whitney
from connwatch._snapshot import SnapshotError, from_dict

SITE = ("/srv/app/db.py", 12, "connect", "socket")
OTHER = ("/srv/app/cache.py", 40, "client", "requests.Session")


def _brute(base: Sequence[float], can: Sequence[float]) -> float:
    ranks, _ = _canary._ranks([*base, *can])
    obs = sum(ranks[len(base):])
    combos = list(itertools.combinations(ranks, len(can)))
    return sum(1 for c in combos if sum(c) >= obs - 1e-9) / len(combos)


def test_rank_test_exact_matches_permutation_and_normal_is_close() -> None:
    assert mann_whitney([1, 2, 3], [4, 5, 6]) == (9.0, 0.05)
    assert mann_whitney([12, 12, 12], [13, 13, 13]) == (9.0, 0.05)  # ties: the same separation
    assert mann_whitney([4, 5, 6], [1, 2, 3])[1] == 1.0
    assert mann_whitney([5, 5], [5, 5])[1] == 1.0
    rng = random.Random(7)
    for _ in range(300):
        base = [rng.randint(0, 4) for _ in range(rng.randint(1, 7))]
        can = [rng.randint(0, 5) for _ in range(rng.randint(1, 7))]
        if len(set(base + can)) > 1:
            assert mann_whitney(base, can)[1] == pytest.approx(_brute(base, can)), (base, can)
    # Above EXACT_MAX the normal approximation (tie-corrected) stays close to the exact value.
    for _ in range(20):
        base = [rng.randint(0, 6) for _ in range(8)]
        can = [rng.randint(1, 7) for _ in range(8)]
        normal = mann_whitney(base, can)[1]
        assert abs(normal - _brute(base, can)) < 0.03


def _procs(lives: Sequence[float], site: tuple = SITE, growth: Optional[Sequence[float]] = None,
           steady: Optional[Sequence[bool]] = None, fd: Optional[Sequence[float]] = None,
           **extra: Sequence[float]) -> List[Process]:
    out = []
    for i, live in enumerate(lives):
        fields: Dict[str, object] = {k: v[i] for k, v in extra.items()}
        r = Reading(float(live), None if growth is None else growth[i], None if steady is None else steady[i],
                    **fields)  # type: ignore[arg-type]
        out.append(Process(f"p{i}", {site: r}, None if fd is None else fd[i]))
    return out


def _site(result: dict, key: tuple = SITE) -> dict:
    return next(s for s in result["sites"] if (s["file"], s["line"], s["function"], s["kind"]) == key)


def test_noise_passes_a_real_shift_fails() -> None:
    rng = random.Random(3)
    fails = 0
    for _ in range(200):
        base = [rng.gauss(12, 2) for _ in range(10)]
        can = [rng.gauss(12, 2) for _ in range(10)]
        fails += judge(_procs(base), _procs(can))["verdict"] == "fail"
    assert fails == 0
    base = [rng.gauss(12, 2) for _ in range(10)]
    result = judge(_procs(base), _procs([x * 1.6 for x in base]))
    assert result["verdict"] == "fail" and _site(result)["verdict"] == "fail"
    assert result["sites"][0]["tests"]["live"]["p"] < 0.01
    # One more client per process at a 12-client site: consistent, but within the tolerance.
    result = judge(_procs([12] * 3), _procs([13] * 3))
    assert result["verdict"] == "pass" and result["score"] == 100
    assert "12 -> 13, within the tolerance 3" in _site(result)["reason"]
    # Shrinking never fails.
    assert judge(_procs([12] * 3), _procs([0] * 3))["verdict"] == "pass"


def test_shift_in_one_process_only_is_marginal() -> None:
    result = judge(_procs([12] * 5), _procs([12, 12, 12, 12, 60]))
    site = _site(result)
    assert site["verdict"] == "marginal" and result["verdict"] == "pass" and result["score"] == 50
    assert "but not in most processes" in site["reason"]
    assert judge(_procs([12] * 5), _procs([12, 12, 12, 12, 60]), Thresholds(min_score=60))["verdict"] == "fail"


def test_groups_too_small_for_the_test_are_judged_on_the_shift() -> None:
    result = judge(_procs([12, 12, 12]), _procs([30]))
    assert _site(result)["verdict"] == "fail"
    assert "too few processes for the rank test" in _site(result)["reason"]
    assert judge(_procs([12, 12, 12]), _procs([13]))["verdict"] == "pass"


def test_slow_leak_fails_with_equal_counts_not_when_both_grow() -> None:
    base = _procs([12] * 3, growth=[0.0] * 3, steady=[False] * 3)
    leak = _procs([12] * 3, growth=[90.0, 95.0, 88.0], steady=[True] * 3)
    result = judge(base, leak)
    site = _site(result)
    assert result["verdict"] == "fail" and site["verdict"] == "fail"
    assert "a slow leak, whatever the live counts (12 -> 12)" in site["reason"]
    # In one canary process of three: shown, not failed (--leak-share 0.5).
    some = _procs([12] * 3, growth=[90.0, 0.0, 0.0], steady=[True, False, False])
    assert _site(judge(base, some))["verdict"] == "marginal"
    assert _site(judge(base, some, Thresholds(leak_share=0.3)))["verdict"] == "fail"
    # The baseline grows the same way (a cache warming in both): no regression.
    assert judge(_procs([12] * 3, growth=[90.0, 92.0, 91.0], steady=[True] * 3), leak)["verdict"] == "pass"
    # Growth that is not steady (a pool filling up) is at most marginal.
    filling = _procs([12] * 3, growth=[90.0, 95.0, 88.0], steady=[False] * 3)
    assert _site(judge(base, filling))["verdict"] == "marginal"
    # Both growing steadily, the canary much faster: fails on the rank test.
    slow = _procs([12] * 5, growth=[10.0, 11.0, 9.0, 10.0, 12.0], steady=[True] * 5)
    fast = _procs([12] * 5, growth=[60.0, 70.0, 65.0, 58.0, 66.0], steady=[True] * 5)
    assert "grows faster in the canary" in _site(judge(slow, fast))["reason"]


def test_new_and_gone_sites() -> None:
    base = _procs([12] * 3)
    small = [Process(f"c{i}", {SITE: Reading(12.0), OTHER: Reading(3.0, 0.0, False)}) for i in range(3)]
    result = judge(base, small)
    assert _site(result, OTHER)["verdict"] == "pass" and _site(result, OTHER)["site"] == "new"
    assert _site(result, OTHER)["reason"] == "new in the canary: 3 live clients per process, not growing"
    big = [Process(f"c{i}", {SITE: Reading(12.0), OTHER: Reading(40.0)}) for i in range(3)]
    assert "more than --max-new 20" in _site(judge(base, big), OTHER)["reason"]
    growing = [Process(f"c{i}", {SITE: Reading(12.0), OTHER: Reading(5.0, 30.0, True)}) for i in range(3)]
    assert "grows steadily" in _site(judge(base, growing), OTHER)["reason"]
    assert judge(base, growing)["verdict"] == "fail"
    # A new site that builds a client per call and closes it: nothing live, but a handshake per
    # call for its upstream (the seed's first remedy broken): fails; a few short-lived ones are marginal.
    def churn(created: float, churning: bool) -> List[Process]:
        return [Process(f"c{i}", {SITE: Reading(12.0), OTHER: Reading(0.0, 0.0, False, created, churning)})
                for i in range(3)]
    site = _site(judge(base, churn(240.0, True)), OTHER)
    assert site["verdict"] == "fail" and "builds a client per call: 240 created/min" in site["reason"], site
    assert site["canary"]["churning"] == 3
    assert _site(judge(base, churn(8.0, True)), OTHER)["verdict"] == "marginal"
    assert _site(judge(base, churn(240.0, False)), OTHER)["verdict"] == "pass"
    gone = judge(small, base)
    assert _site(gone, OTHER)["verdict"] == "pass" and _site(gone, OTHER)["reason"] == "gone in the canary"
    # A site only some canary processes have: the others count as zero there.
    part = [Process("c0", {SITE: Reading(12.0)}), Process("c1", {}), Process("c2", {})]
    assert _site(judge(base, part))["canary"]["live"]["mean"] == 4


def test_churn_gc_and_fds_when_present() -> None:
    quiet = _procs([1] * 4, created_per_min=[5.0, 6.0, 4.0, 5.0], churning=[False] * 4,
                   gc_released_per_min=[0.0] * 4, fd=[0.10, 0.11, 0.10, 0.12])
    busy = _procs([1] * 4, created_per_min=[300.0, 280.0, 310.0, 290.0], churning=[True] * 4,
                  gc_released_per_min=[0.0] * 4, fd=[0.10, 0.11, 0.10, 0.12])
    site = _site(judge(quiet, busy))
    assert site["verdict"] == "fail" and "creates more clients: 5 -> 295/min" in site["reason"]
    assert site["canary"]["churning"] == 4 and site["tests"]["created_per_min"]["result"] == "higher"
    collected = _procs([1] * 4, created_per_min=[5.0] * 4, gc_released_per_min=[20.0, 22.0, 25.0, 21.0],
                       fd=[0.10] * 4)
    assert "left to the garbage collector" in _site(judge(quiet, collected))["reason"]
    # Absent measures are not judged (snapshots without churn fields, Prometheus without GC).
    plain = judge(_procs([1] * 4), _procs([1] * 4))
    assert set(_site(plain)["tests"]) == {"live"} and plain["fds"] is None
    fds = _procs([1] * 4, fd=[0.6, 0.62, 0.61, 0.6])
    result = judge(quiet, fds)
    assert result["fds"]["verdict"] == "fail" and result["verdict"] == "fail"
    ok = judge(quiet, quiet, Thresholds(max_fd_utilization=0.115))
    assert ok["fds"]["verdict"] == "fail" and "more than --max-fd-utilization" in ok["fds"]["reason"]


def test_readings_from_a_snapshot_merge_roles_and_keep_churn() -> None:
    def row(role: str, live: int, **kw: object) -> dict:
        return {"kind": "socket", "role": role, "file": "/srv/a.py", "line": 3, "function": "f", "live": live,
                "created": live + 5, "gc_released": 6, "traceback": [], **kw}

    data = {"schema": "connwatch.snapshot/1", "pid": 7, "host": "h", "time": 1120.0, "started": 1000.0,
            "fds": {"open": 50, "limit": 1000}, "totals": {"live": 3, "created": 13, "closed": 10},
            "callsites": [row("client", 2, suspected_leak=True, growth_per_min=4.0, growth_samples=5,
                              growth_window_s=4.0, churn={"created_per_min": 7.5}, suspected_churn=True),
                          row("accepted", 1, suspected_leak=False, growth_per_min=0.0, growth_samples=1,
                              growth_window_s=0.0)]}
    proc = _canary.process_from_snapshot(data)
    assert proc.name == "h-7" and proc.fd_utilization == 0.05
    r = proc.sites[("/srv/a.py", 3, "f", "socket")]
    assert (r.live, r.growth_per_min, r.steady, r.created_per_min, r.churning) == (3.0, 4.0, True, 7.5, True)
    assert r.gc_released_per_min == 6.0  # 12 released by GC in 2 minutes of uptime
    with pytest.raises(ValueError):
        judge([], [proc])
    # Not a snapshot: the same errors as from_dict gives diff and report.
    for bad, words in (({**data, "schema": "x"}, "not a connwatch snapshot"),
                       ({**data, "callsites": [{"file": "a"}]}, "bad call site row"),
                       ({**data, "callsites": [{**row("client", 1), "live": "many"}]}, "bad call site row"),
                       ({**data, "pid": "7"}, "bad or missing 'pid'")):
        with pytest.raises(SnapshotError, match=words):
            _canary.process_from_snapshot(bad, "f.json")
        with pytest.raises(SnapshotError):
            from_dict(bad, "f.json")


def test_prometheus_reader_pure_parts() -> None:
    assert _promsource.parse_duration("30m") == 1800 and _promsource.parse_duration("1h30m") == 5400
    assert _promsource.parse_duration("500ms") == 0.5 and _promsource.parse_duration("15") == 15
    for bad in ("", "5 minutes", "-3s", "0", "1x"):
        with pytest.raises(ValueError):
            _promsource.parse_duration(bad)
    assert _promsource.parse_time("1764150000.5") == 1764150000.5
    assert _promsource.parse_time("2026-12-03T09:30:00Z") == _promsource.parse_time("2026-12-03T10:30:00+01:00")
    assert _promsource.parse_time("2026-12-03T09:30:00") == 1796290200.0
    with pytest.raises(ValueError):
        _promsource.parse_time("yesterday")
    assert _promsource.selector('{job="api"}') == 'job="api"'
    assert _promsource.selector('job="api", track="canary"') == 'job="api", track="canary"'
    for bad in ("", "{}", 'a{b="c"}'):
        with pytest.raises(ValueError):
            _promsource.selector(bad)
    assert _promsource._increase([(0, 5.0), (1, 8.0), (2, 2.0), (3, 4.0)]) == 7.0  # a restart at t=2
    spread = _promsource._spread([(float(t), t) for t in range(100)], 8)
    assert len(spread) == 8 and spread[-1] == (99.0, 99) and spread[0][0] < 13


def test_large_folders_are_read_by_worker_processes_with_the_same_result(tmp_path: Any, monkeypatch: Any) -> None:
    """Worker interpreters read a big folder exactly as one process does (order, skipped files),
    and the agent stays off in them even when the caller's environment enables it."""
    import json

    from connwatch.cli import canary as cli_canary

    folder = tmp_path / "group"
    folder.mkdir()
    for pid in range(1, 41):
        rows = [{"kind": "socket", "role": "client", "file": f"/srv/m{i}.py", "line": i, "function": "f",
                 "library": False, "live": pid % 5 + i, "created": 9, "closed": 0, "gc_released": 0,
                 "oldest_age_s": None, "upstreams": {}, "traceback": [], "suspected_churn": pid % 2 == 0,
                 "churn": {"created_per_min": float(pid)}} for i in range(30)]
        data = {"schema": "connwatch.snapshot/1", "pid": pid, "host": "h", "time": 1120.0, "started": 1000.0,
                "fds": {"open": pid, "limit": 1000}, "totals": {"live": 0, "created": 0, "closed": 0},
                "callsites": rows}
        (folder / f"h-{pid}.json").write_text(json.dumps(data))
    (folder / "h-99.json").write_text("{not json")
    paths = sorted(str(p) for p in folder.glob("*.json"))
    agent_dir = tmp_path / "agent"
    monkeypatch.setenv("CONNWATCH_ENABLED", "1")
    monkeypatch.setenv("CONNWATCH_DIR", str(agent_dir))
    here = [cli_canary._read_one(p) for p in paths]
    assert [s for s, _ in here].count("bad") == 1
    assert cli_canary._read_in_workers(paths, 3) == here
    assert not agent_dir.exists() or not list(agent_dir.iterdir())  # no agent ran in the workers
    one = cli_canary.load_folder(str(folder), workers=1)
    many = cli_canary.load_folder(str(folder), workers=2)
    assert one == many and len(one[0]) == 40 and len(one[1]) == 1
    assert len(paths) >= cli_canary.PARALLEL_MIN_FILES
