"""The registry: exact counts, no strong references, GC release, threads, re-entrancy."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any, List

import pytest

from connwatch import _registry
from connwatch._callsite import CallSite

SITE = CallSite("/app/a.py", 10, "f", False, (("/app/a.py", 10, "f"),))
OTHER = CallSite("/app/b.py", 20, "g", False, ())


class Client:
    """A stand-in client object (what is tracked is any weak-referenceable object)."""


@pytest.fixture(autouse=True)
def _clean() -> Any:
    _registry.clear()
    yield
    _registry.clear()


def rec(kind: str = "k", site: CallSite = SITE, role: Any = None) -> Any:
    for r in _registry.records():
        if r[0] == kind and r[2] is site and r[1] == role:
            return r
    return None


def test_track_release_counts_exactly() -> None:
    objs = [Client() for _ in range(5)]
    for o in objs:
        _registry.track(o, "k", SITE, upstream="h:1")
    _k, _r, _s, live, created, gc_rel, _o, ups, *_ = rec()
    assert (live, created, gc_rel) == (5, 5, 0)
    assert ups == (("h:1", 5, 5),)
    assert _registry.upstream_live("h:1") == 5
    for o in objs[:3]:
        assert _registry.release(o)
    assert not _registry.release(objs[0]), "a second release is a no-op"
    r = rec()
    assert (r[3], r[4]) == (2, 5)
    assert _registry.upstream_live("h:1") == 2
    assert _registry.live_total() == 2


def test_holds_no_strong_reference_and_counts_gc_release() -> None:
    o = Client()
    w = weakref.ref(o)
    _registry.track(o, "k", SITE)
    del o
    gc.collect()
    assert w() is None, "the registry kept the object alive"
    r = rec()
    assert (r[3], r[4], r[5]) == (0, 1, 1)


def test_oldest_age_is_the_oldest_live_object() -> None:
    a, b = Client(), Client()
    _registry.track(a, "k", SITE)
    time.sleep(0.05)
    _registry.track(b, "k", SITE)
    born_a = rec()[6]
    _registry.release(a)
    assert rec()[6] > born_a
    _registry.release(b)
    assert rec()[6] is None


def test_role_move_keeps_one_object_counted_once() -> None:
    o = Client()
    _registry.track(o, "socket", SITE)
    _registry.set_role(o, "client", "10.0.0.1:80")
    assert rec("socket") is None or rec("socket")[3] == 0
    r = rec("socket", role="client")
    assert (r[3], r[4]) == (1, 1)
    assert sum(x[4] for x in _registry.records()) == 1, "created is not counted twice"
    assert _registry.info(o) == ("socket", "client", SITE, "10.0.0.1:80")
    _registry.release(o)
    assert rec("socket", role="client")[3] == 0


def test_transfer_hands_the_record_to_the_new_object() -> None:
    raw, wrapped = Client(), Client()
    _registry.track(raw, "socket", SITE, "client", "h:1")
    _registry.track(wrapped, "socket", OTHER)
    assert _registry.transfer(raw, wrapped)
    assert not _registry.is_tracked(raw)
    assert _registry.info(wrapped) == ("socket", "client", SITE, "h:1")
    assert sum(r[3] for r in _registry.records()) == 1
    assert sum(r[4] for r in _registry.records()) == 1


def test_threads_exact_counts() -> None:
    errors: List[BaseException] = []

    def work() -> None:
        try:
            for _ in range(2000):
                o = Client()
                _registry.track(o, "k", SITE)
                if _ % 3:
                    _registry.release(o)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    gc.collect()
    r = rec()
    assert r[4] == 16 * 2000
    assert r[3] == 0
    assert r[5] == 16 * sum(1 for i in range(2000) if i % 3 == 0)  # the unreleased were collected


class Closer:
    """Closes (releases) a tracked object from __del__, and sits in a reference cycle, so the
    cyclic GC finalizes it at an arbitrary allocation: possibly inside the registry's lock."""

    def __init__(self, target: Client) -> None:
        self.target = target
        self.me = self

    def __del__(self) -> None:
        _registry.release(self.target)


def test_release_from_gc_inside_critical_section_is_deferred_not_lost() -> None:
    old = gc.get_threshold()
    gc.set_threshold(1, 1, 1)  # collect at nearly every allocation
    try:
        keep = []
        for _ in range(3000):
            t = Client()
            keep.append(t)
            _registry.track(t, "k", SITE)
            Closer(t)  # garbage cycle: its __del__ releases t during some later allocation
            o = Client()
            _registry.track(o, "k", OTHER)
            _registry.release(o)
    finally:
        gc.set_threshold(*old)
    gc.collect()
    r = rec()
    assert r[4] == 3000
    assert r[3] == 0, "every release from __del__ was applied"
    assert rec("k", OTHER)[3] == 0


def test_id_reuse_does_not_corrupt_counts() -> None:
    for _ in range(5000):
        _registry.track(Client(), "k", SITE)  # dies at once; the next one often reuses its id
    r = rec()
    assert (r[3], r[4], r[5]) == (0, 5000, 5000)


def test_reserve_is_exact_and_released() -> None:
    assert _registry.reserve(SITE, "h:1", 2, None, None) is None
    assert _registry.reserve(SITE, "h:1", 2, None, None) is None
    assert _registry.reserve(SITE, "h:1", 2, None, None) == ("process", 2, 2)
    _registry.unreserve((SITE, "h:1"))
    o = Client()
    _registry.track(o, "k", SITE, upstream="h:1", reservation=(SITE, "h:1"))
    assert _registry.cap_live() == 1
    assert _registry.reserve(SITE, "h:1", None, 1, None) == ("callsite", 1, 1)
    assert _registry.reserve(SITE, "h:1", None, None, 1) == ("upstream", 1, 1)
    assert _registry.reserve(OTHER, "h:2", None, 1, 1) is None


def test_listeners_and_pairs_do_not_count_toward_caps() -> None:
    a, b, c = Client(), Client(), Client()
    _registry.track(a, "socket", SITE, "listener")
    _registry.track(b, "socket", SITE, "pair")
    _registry.track(c, "socket", SITE, "client", "h:1")
    assert _registry.cap_live() == 1


def test_reentrant_call_from_inside_the_critical_section_is_deferred_and_applied() -> None:
    # Deterministic re-entry: user code (a str subclass's __hash__) runs while the registry
    # holds its lock, and it releases and tracks objects, as a __del__ run by the GC could.
    victim, newcomer = Client(), Client()
    _registry.track(victim, "k", OTHER)
    calls = []

    class Upstream(str):
        def __hash__(self) -> int:
            if not calls:
                calls.append(_registry._busy)
                _registry.release(victim)
                _registry.track(newcomer, "k", OTHER)
            return str.__hash__(self)

    o = Client()
    _registry.track(o, "k", SITE, upstream=Upstream("h:9"))
    _registry.flush()
    assert calls == [True], "the hook ran inside the critical section"
    r = rec("k", OTHER)
    assert (r[3], r[4]) == (1, 2), "the deferred release and track were both applied"
    assert _registry.is_tracked(newcomer) and not _registry.is_tracked(victim)


def test_lifetimes_are_taken_at_release_not_when_events_are_applied() -> None:
    from connwatch._leaks import median_lifetime

    quick = [Client() for _ in range(6)]
    slow = [Client() for _ in range(3)]
    for o in quick + slow:
        _registry.track(o, "k", SITE)
    for o in quick:
        _registry.release(o)  # lives well under 40 ms
    time.sleep(0.1)
    for o in slow:
        _registry.release(o)  # lives 100 ms or more
    time.sleep(1.0)  # the events are applied only now, by the read below
    r = rec()
    lives, first = r[8], r[9]
    assert len(lives) == _registry.LIFE_BUCKETS and sum(lives) == 9
    low_quick = _registry.life_bucket_bounds(max(i for i, n in enumerate(lives[:8]) if n))[1]
    assert sum(lives[:8]) == 6 and low_quick <= 0.08, lives  # buckets below 78 ms: the quick ones
    bucket_slow = [i for i, n in enumerate(lives) if n and i >= 8]
    assert sum(lives[i] for i in bucket_slow) == 3
    assert all(_registry.life_bucket_bounds(i)[1] <= 0.625 for i in bucket_slow), "measured at release, not 1.1 s later"
    assert median_lifetime(lives) is not None and median_lifetime(lives) < 0.08
    assert first <= time.monotonic()
    # A collected client's lifetime is taken when it is collected.
    gone = Client()
    _registry.track(gone, "k", SITE)
    del gone
    gc.collect()
    time.sleep(0.2)
    assert sum(rec()[8]) == 10 and rec()[5] == 1
    assert sum(rec()[8][:8]) == 7


def test_lifetime_buckets_match_their_bounds() -> None:
    """The inline bucketing (pure Python hot path) agrees with the bounds the readers use."""
    import random

    rng = random.Random(7)
    lives = [0.0, 1e-9, 5e-4, 6.1e-4, 6.2e-4, 9.99, 10.0, 10.01, 20.0, 5119.0, 5121.0, 1e7]
    lives += [10.0 * 2.0 ** rng.uniform(-18, 12) for _ in range(2000)]
    for life in lives:
        i = _registry.life_bucket(life)
        low, high = _registry.life_bucket_bounds(i)
        assert 0 <= i < _registry.LIFE_BUCKETS and low * (1 - 1e-12) <= life < high * (1 + 1e-12), (life, i, low, high)
    assert _registry.life_bucket(10.0) == _registry.LIFE_AT_10S
