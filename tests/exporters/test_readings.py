"""Bounded cardinality and collection cost of the metric readings (in-process, real registry)."""

from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path
from typing import Any, List

from connwatch.exporters import _readings
from connwatch.exporters.prometheus import render


def _sites_module(tmp_path: Path, n: int, name: str) -> Any:
    # n functions on n distinct lines, each creating one socket: n call sites.
    src = "import socket\n" + "".join(f"def f{i}():\n    return socket.socket()\n" for i in range(n))
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overflow_keeps_first_sites_and_sums_the_rest(agent: Any, tmp_path: Path) -> None:
    mod = _sites_module(tmp_path, 10, "ten_sites")
    keep: List[socket.socket] = [getattr(mod, f"f{i}")() for i in range(10)]
    c = _readings.Collector(max_callsites=3)
    live = {a: v for a, v in c.reading().live.items()
            if str(dict(a)[_readings.FILE]).endswith(("ten_sites.py", "_other"))}
    own = {dict(a)[_readings.LINE]: v for a, v in live.items() if dict(a)[_readings.FILE] != "_other"}
    other = [v for a, v in live.items() if dict(a)[_readings.FILE] == "_other"]
    assert own == {3: 1, 5: 1, 7: 1}, own  # the first three sites seen, deterministic
    assert other == [7]
    # Later readings keep the same admitted sites (a site never changes series).
    c.max_age_s = 0
    again = {dict(a)[_readings.LINE] for a in c.reading().live if str(dict(a)[_readings.FILE]).endswith("ten_sites.py")}
    assert again == {3, 5, 7}
    # The snapshot (and so the report) still shows all ten.
    snap = agent.snapshot()
    assert sum(1 for s in snap.statistics("callsite") if s.site and s.site.file.endswith("ten_sites.py")) == 10
    text = render(c.reading())
    assert 'code_file_path="_other"' in text
    for s in keep:
        s.close()


def _cost(c: _readings.Collector) -> float:
    c.max_age_s = 0
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        c.reading()
        best = min(best, time.perf_counter() - t0)
    return best


def test_collection_cost_grows_with_sites_not_clients(agent: Any, tmp_path: Path) -> None:
    few = _sites_module(tmp_path, 10, "few_sites")
    keep = [few.f0() for _ in range(2000)]  # 2000 live clients at one site
    keep += [getattr(few, f"f{i}")() for i in range(1, 10)]
    c10 = _cost(_readings.Collector(max_callsites=5000))
    many = _sites_module(tmp_path, 1000, "many_sites")
    keep += [getattr(many, f"f{i}")() for i in range(1000)]
    c1010 = _cost(_readings.Collector(max_callsites=5000))
    print(f"collection: {c10 * 1e6:.0f} us at 10 sites (2009 clients), {c1010 * 1e3:.2f} ms at 1010 sites")
    assert c10 < 0.002, c10  # 2000 clients at few sites: still cheap
    assert c1010 < 0.05, c1010
    for s in keep:
        s.close()
