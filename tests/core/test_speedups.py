"""The C hot path (connwatch._speedups) and the pure-Python one count exactly the same.

The same seeded random sequence of registry operations (track with roles and upstreams,
release, role moves, ownership transfers, collections, cap reservations, re-entrant drains)
runs in two fresh interpreters, one per path; the records after every step must be equal.
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any, List

import pytest

from tests.conftest import clean_env, run_py

SCRIPT = textwrap.dedent(
    """
    import gc, json, random, sys
    from connwatch import _accel, _registry
    from connwatch._callsite import CallSite

    random.seed(int(sys.argv[1]))
    steps = int(sys.argv[2])
    gc.disable()  # collections happen where the script drops the last reference, nowhere else

    class Client:
        pass

    sites = [CallSite(f"/app/m{i}.py", i, f"f{i}", i == 3, ()) for i in range(5)]
    kinds = ["socket", "requests.Session", "grpc.Channel"]
    roles = [None, "client", "listener", "accepted"]
    ups = [None, "a:1", "b:2", "[::1]:3"]
    live = []
    out = [_accel.speedups is not None]

    def state():
        rows = sorted(
            (k, r or "", s.file, n, c, g, o is not None, sorted(u), sum(lives))
            for k, r, s, n, c, g, o, u, lives, _first in _registry.records()
        )
        return [rows, _registry.live_total(), _registry.cap_live(),
                [_registry.upstream_live(u) for u in ups if u]]

    for step in range(steps):
        op = random.random()
        if op < 0.35 or not live:
            o = Client()
            kind = random.choice(kinds)
            res = None
            if random.random() < 0.2:
                res = (random.choice(sites), random.choice(ups)) if _registry.reserve(
                    sites[0], None, None, None, None) is None else None
            _registry.track(o, kind, random.choice(sites), random.choice(roles), random.choice(ups),
                            reservation=res)
            live.append(o)
        elif op < 0.55:
            o = random.choice(live)
            out.append(_registry.release(o))
        elif op < 0.70:
            o = live.pop(random.randrange(len(live)))
            del o  # the weakref callback queues a collection
        elif op < 0.85:
            o = random.choice(live)
            _registry.set_role(o, random.choice(roles), random.choice(ups))
        elif op < 0.92 and len(live) > 1:
            a, b = random.sample(live, 2)
            out.append(_registry.transfer(a, b))
        elif op < 0.96:
            if _registry.reserve(random.choice(sites), random.choice(ups), 10**6, 10**6, 10**6) is None:
                pass  # held: handed back below or to a track
            _registry.unreserve((sites[0], None))
        else:
            _registry.flush()
        if step % 7 == 0:
            out.append(state())
    out.append(state())
    print(json.dumps(out))
    """
)


def _run(tmp_path: Any, pure: bool, seed: int) -> List[Any]:
    script = tmp_path / "ops.py"
    script.write_text(SCRIPT)
    env = clean_env(CONNWATCH_PURE_PYTHON="1" if pure else "0")
    proc = run_py([str(script), str(seed), "600"], env=env)
    assert proc.returncode == 0, proc.stderr
    out: List[Any] = json.loads(proc.stdout)
    return out


def _has_speedups() -> bool:
    proc = run_py(["-c", "import connwatch._accel as a; print(a.speedups is not None)"],
                  env=clean_env(CONNWATCH_PURE_PYTHON="0"))
    return proc.stdout.strip() == "True"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_and_python_paths_count_the_same(tmp_path: Any, seed: int) -> None:
    if not _has_speedups():
        if os.environ.get("CI"):
            pytest.fail("connwatch._speedups is not built: CI must test the C path")
        pytest.skip("connwatch._speedups not built here (no C compiler): only the Python path exists")
    c_out, py_out = _run(tmp_path, False, seed), _run(tmp_path, True, seed)
    assert c_out[0] is True and py_out[0] is False, "each run must use the path it was asked for"
    assert len(c_out) == len(py_out)
    for i, (a, b) in enumerate(zip(c_out[1:], py_out[1:])):
        assert a == b, f"step record {i}: C {a!r} != Python {b!r}"
    final_rows = c_out[-1][0]
    assert final_rows and any(r[3] for r in final_rows), "the sequence must leave live objects to compare"


def test_pure_python_switch_is_honoured() -> None:
    code = "import connwatch._registry as r, connwatch._callsite as c; print(r.ACCELERATED, type(c.find).__name__)"
    proc = run_py(["-c", code], env=clean_env(CONNWATCH_PURE_PYTHON="1"))
    assert proc.stdout.split() == ["False", "function"], proc.stderr
