"""The HTML report at scale (a section of ``benchmarks/run.py``; also runs alone).

    python benchmarks/html_report.py [--quick]

``connwatch report FILE --html OUT`` for one process with 1,000 call sites (16-frame tracebacks,
upstreams, a full window of samples each): the page's size, the whole command's time, and, when
Debian's chromium and Playwright are here, how long the page takes to open in headless Chromium:
from navigation start until the first frame painted after the page's script drew everything
(wall clock), and the renderer's main-thread CPU time over the load (Chrome's ThreadTime metric);
medians of 5 loads in one browser (1 with --quick). Nothing is asserted.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _snapshot_file(path: Path, sites: int) -> None:
    from connwatch import _leaks, _snapshot
    from connwatch._callsite import CallSite

    now = time.time()
    kinds = ("socket", "requests.Session", "grpc.Channel", "urllib3.PoolManager", "httpx.Client")
    stats = []
    for i in range(sites):
        file = f"/srv/app/pkg{i % 20}/mod{i % 50}.py"
        tb = [(file, 10 + i, f"handler_{i}")]
        tb += [(f"/srv/app/pkg{i % 20}/layer{d}.py", 100 + i % (d + 3), f"layer{d}_{i % (d + 3)}") for d in range(11)]
        tb += [("/srv/app/server.py", 120, "handle"), ("/srv/app/server.py", 88, "serve_forever"),
               ("/usr/lib/python3/threading.py", 1045, "Thread._bootstrap_inner"),
               ("/usr/lib/python3/threading.py", 1002, "Thread._bootstrap")]
        live = 1 + (i * 7919) % 23
        samples = tuple((now - 10.0 * (7 - k), max(0, live - (7 - k) * (i % 3))) for k in range(8))
        kind = kinds[i % len(kinds)]
        stats.append(_snapshot.Statistic(
            kind, "client" if kind == "socket" else None, CallSite(file, 10 + i, f"handler_{i}", False, tuple(tb)),
            live, live + 40, 40, upstreams=((f"svc{i % 30}.internal:8080", live),), oldest_age_s=30.0,
            growth=_leaks.assess(samples), samples=samples))
    snap = _snapshot.Snapshot(tuple(stats), now, 4242, "web-1", "api", ("app.py",), now - 3600, 900, 1024)
    snap.dump(str(path))


def _open_times(page: Path, loads: int) -> Optional[Dict[str, float]]:
    if not os.access(CHROMIUM, os.X_OK):
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    painted, cpu = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for _ in range(loads + 1):  # the first load warms the browser up and is not counted
                tab = browser.new_page(viewport={"width": 1280, "height": 900})
                cdp = tab.context.new_cdp_session(tab)
                cdp.send("Performance.enable")
                tab.goto(page.resolve().as_uri())
                tab.wait_for_selector("body[data-painted='1']", timeout=60_000)
                metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
                painted.append(float(tab.evaluate("window.cwReady.painted")))
                cpu.append(1000.0 * float(metrics.get("ThreadTime", 0.0)))
                tab.close()
        finally:
            browser.close()
    return {"painted_ms": statistics.median(painted[1:]), "main_thread_cpu_ms": statistics.median(cpu[1:])}


def html_scale(quick: bool) -> List[Dict[str, Any]]:
    """One row per page size: bytes, the command's time, and the open times (None without a browser)."""
    out = []
    for sites in (1000,):
        with tempfile.TemporaryDirectory(prefix="connwatch-bench-") as tmp:
            snap, page = Path(tmp) / "web-1-4242.json", Path(tmp) / "report.html"
            _snapshot_file(snap, sites)
            times = []
            for _ in range(1 if quick else 5):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "connwatch", "report", str(snap), "--html", str(page)],
                                      capture_output=True, text=True, cwd="/",
                                      env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
                times.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise RuntimeError(f"connwatch report --html failed: {proc.stderr[-2000:]}")
            row: Dict[str, Any] = {"call_sites": sites, "frames_per_site": 16, "bytes": page.stat().st_size,
                                   "command_seconds": statistics.median(times)}
            opened = _open_times(page, 1 if quick else 5)
            row.update(opened or {"painted_ms": None, "main_thread_cpu_ms": None})
            out.append(row)
    return out


def markdown(rows: List[Dict[str, Any]]) -> List[str]:
    lines = ["| `connwatch report --html` | page size | command (median of 5; 1 with --quick) | opens in Chromium: "
             "drawn and painted (median of 5 loads; 1 with --quick) | renderer main-thread CPU |",
             "|---|---|---|---|---|"]
    for r in rows:
        opened = "n/a (no chromium)" if r["painted_ms"] is None else f"{r['painted_ms']:.0f} ms"
        cpu = "n/a" if r["main_thread_cpu_ms"] is None else f"{r['main_thread_cpu_ms']:.0f} ms"
        lines.append(f"| {r['call_sites']:,} call sites, {r['frames_per_site']} frames each | "
                     f"{r['bytes'] / 1e6:.2f} MB | {r['command_seconds']:.2f} s | {opened} | {cpu} |")
    return lines


if __name__ == "__main__":
    print("\n".join(markdown(html_scale("--quick" in sys.argv[1:]))))
