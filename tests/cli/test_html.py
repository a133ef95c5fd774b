"""``connwatch report --html``: the page made from a real leak scenario's folder, opened and driven
in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Outside CI a missing ``/usr/bin/chromium`` (or Playwright) skips the browser tests with the reason;
with ``CI=true`` it fails them (``scripts/test.sh`` installs both). The screenshot is kept in
``$CONNWATCH_TEST_ARTIFACTS`` (default: the test's tmp folder); the README's ``docs/report.png``
is made by running this test with ``CONNWATCH_TEST_ARTIFACTS=docs``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from connwatch import _leaks
from connwatch._callsite import CallSite
from connwatch._snapshot import Snapshot, Statistic
from connwatch.cli._html import histories, page_data, render

from .conftest import connwatch_cli, site_row, validate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: scripts/test.sh installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A real headless Chromium (the system's), driven by Playwright."""
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no {CHROMIUM} (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (test extra)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CONNWATCH_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """A page opened from disk, with every request and every console or script error recorded."""

    def __init__(self, browser: Any, path: Path, width: int = 1280) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.requests: List[str] = []
        self.errors: List[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-painted='1']", timeout=30_000)

    def box(self, selector: str) -> Dict[str, float]:
        loc = self.page.locator(selector)
        assert loc.count() == 1, f"{loc.count()} elements match {selector}"
        b = loc.bounding_box()
        assert b is not None, f"{selector} is not visible"
        return b

    def close(self) -> None:
        self.context.close()


def _leak_folder(apps: Any, tcp_server: Any) -> Tuple[Path, Any, Any, Any]:
    """A folder written by real agents: a leaking process (with copies of its snapshot file taken
    over time: a history), a pool that plateaus and a process that builds a client per call."""
    leak = apps("leak", tcp_server.port)
    pool = apps("pool", tcp_server.port, "5")
    churn = apps("churn", tcp_server.port)
    folder = leak.path.parent
    # Three copies a window apart (as a cron job would keep them): the history gives the chart more
    # than one window of samples.
    leak.wait_for(lambda d: bool(d["callsites"]))
    for i in range(3):
        time.sleep(_leaks.WINDOW * 0.2)
        shutil.copy(leak.path, folder / f"{leak.path.stem}-{i}.json")
    leak.wait_for(lambda d: bool(site_row(d, "connect_leaky").get("suspected_leak")))
    pool.wait_for(lambda d: site_row(d, "connect_pooled")["live"] == 5)
    churn.wait_for(lambda d: bool(site_row(d, "connect_churn").get("suspected_churn")))
    for app in (leak, pool, churn):
        assert app.finish() == 0  # final snapshots: the folder no longer changes
    return folder, leak, pool, churn


def test_report_html_of_a_leak_scenario_in_chromium(apps: Any, tcp_server: Any, tmp_path: Path,
                                                    browser: Any) -> None:
    folder, leak, pool, churn = _leak_folder(apps, tcp_server)
    out = tmp_path / "report.html"
    proc = connwatch_cli("report", str(folder), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"wrote .*report\.html: 3 processes, 3 call sites, 6 snapshot files", proc.stdout), proc.stdout
    html = out.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html), "the page loads nothing"

    leak_data, pool_data, churn_data = (json.loads(a.path.read_text()) for a in (leak, pool, churn))
    for data in (leak_data, pool_data, churn_data):
        validate(data)
    leaky = site_row(leak_data, "connect_leaky")
    # The snapshot carries its window: [time, live] per call site, [time, open fds] for the process,
    # the newest being the snapshot's own reading.
    assert leaky["suspected_leak"] is True and len(leaky["samples"]) == _leaks.WINDOW
    assert [round(t, 1) for t, _ in leaky["samples"]] == sorted(round(t, 1) for t, _ in leaky["samples"])
    assert abs(leaky["samples"][-1][0] - leak_data["time"]) < 0.01 and leaky["samples"][-1][1] == leaky["live"]
    assert leaky["samples"][0][1] < leaky["live"]
    assert len(leak_data["fd_samples"]) == _leaks.WINDOW and leak_data["fd_samples"][-1][1] == leak_data["fds"]["open"]
    assert leaky["traceback"][0]["function"] == "connect_leaky"  # innermost first in the file
    pooled = site_row(pool_data, "connect_pooled")
    churning = site_row(churn_data, "connect_churn")
    assert churning["suspected_churn"] is True
    total = sum(d["totals"]["live"] for d in (leak_data, pool_data, churn_data))
    assert leaky["live"] > 2 * pooled["live"] > 0

    page = Page(browser, out)
    try:
        p = page.page
        assert page.errors == []
        assert page.requests == [page.url], "the page fetched something besides itself"
        # The folder has two processes: a picker, and the totals across them.
        assert p.locator("#cw-proc option").count() == 4
        foot = p.locator("#cw-proctable tfoot td").all_inner_texts()
        assert foot[0] == "total" and foot[6] == f"{total:,}"
        # The flame graph holds the leaking line's frame, as wide as its share of the live clients.
        root = page.box(".fr.root")
        assert p.locator(".fr.root").get_attribute("data-live") == str(total)
        frame = f'.fr[data-func="connect_leaky"][data-line="{leaky["line"]}"]'
        assert p.locator(frame).get_attribute("data-file") == leaky["file"]
        assert p.locator(frame).get_attribute("data-live") == str(leaky["live"])
        assert "leak" in (p.locator(frame).get_attribute("class") or "").split()
        want = root["width"] * leaky["live"] / total
        assert abs(page.box(frame)["width"] - want) <= 1.5, (page.box(frame)["width"], want)
        pooled_frame = f'.fr[data-func="connect_pooled"][data-line="{pooled["line"]}"]'
        assert abs(page.box(pooled_frame)["width"] - root["width"] * pooled["live"] / total) <= 1.5
        # Outermost frame at the top: the frame that called connect_leaky is the row above it.
        work = leaky["traceback"][1]
        above = page.box(f'.fr[data-func="{work["function"]}"][data-line="{work["line"]}"]')
        assert above["y"] < page.box(frame)["y"] and above["width"] >= page.box(frame)["width"] - 0.5

        # Hover: counts and the upstream.
        p.hover(frame)
        tip = p.locator("#cw-tip").inner_text()
        assert "connect_leaky" in tip and f"{leaky['live']} live clients" in tip
        assert tcp_server.upstream in tip and "suspected leak" in tip

        # Click to zoom: the frame fills the width, the other stack is gone; reset brings it back.
        p.click(frame)
        assert abs(page.box(frame)["width"] - root["width"]) <= 1.0
        assert p.locator(pooled_frame).count() == 0
        assert "zoomed on connect_leaky" in p.locator("#cw-zoomed").inner_text()
        p.click("#cw-reset")
        assert abs(page.box(frame)["width"] - want) <= 1.5 and p.locator(pooled_frame).count() == 1

        # Search: a function highlights its frame and dims the others; a file matches both stacks.
        p.fill("#cw-search", "connect_pooled")
        assert "hit" in (p.locator(pooled_frame).get_attribute("class") or "").split()
        assert "dim" in (p.locator(frame).get_attribute("class") or "").split()
        assert p.locator("#cw-matches").get_attribute("data-live") == str(pooled["live"])
        p.fill("#cw-search", "sockapp.py")
        assert p.locator("#cw-matches").get_attribute("data-live") == str(total)
        assert "hit" in (p.locator(frame).get_attribute("class") or "").split()
        p.fill("#cw-search", "")
        assert p.locator(".fr.hit, .fr.dim").count() == 0

        # Per call site, a chart of live clients over time: the leaking process's history files give
        # it more readings than one window, and it is marked as a suspected leak.
        block = p.locator(f'.site[data-func="connect_leaky"][data-line="{leaky["line"]}"]')
        assert "leak" in (block.get_attribute("class") or "").split()
        assert "suspected leak" in block.inner_text()
        assert int(block.locator("svg.chart").get_attribute("data-points") or 0) > _leaks.WINDOW + 2
        # The leaking site comes first (what to fix first), then the churning one, marked as such.
        assert p.locator(".site").first.get_attribute("data-func") == "connect_leaky"
        block = p.locator(".site").nth(1)
        assert block.get_attribute("data-func") == "connect_churn"
        assert "churn" in (block.get_attribute("class") or "").split() and "churn" in block.inner_text()
        assert foot[10] == "1"  # one churning call site in the folder

        # Pick one process: its own summary and graph.
        option = p.locator("#cw-proc option", has_text=re.compile(rf"^pid {pool.pid}\b"))
        p.select_option("#cw-proc", value=option.get_attribute("value"))
        assert p.locator(".fr.root").get_attribute("data-live") == str(pool_data["totals"]["live"])
        assert p.locator(frame).count() == 0 and p.locator(pooled_frame).count() == 1
        assert f"pid {pool.pid}" in p.locator("#cw-summary h2").inner_text()
        p.select_option("#cw-proc", value="-1")
        assert page.errors == []
        p.screenshot(path=str(_artifacts(tmp_path) / "report.png"), full_page=True)
    finally:
        page.close()


def _site(i: int, live: int, depth: int = 16, now: float = 1_800_000_000.0) -> Statistic:
    file = f"/srv/app/pkg{i % 20}/mod{i % 50}.py"
    tb = [(file, 10 + i, f"handler_{i}")]
    tb += [(f"/srv/app/pkg{i % 20}/layer{d}.py", 100 + i % (d + 3), f"layer{d}_{i % (d + 3)}")
           for d in range(depth - 3)]
    tb += [("/srv/app/server.py", 120, "handle"), ("/srv/app/server.py", 88, "serve_forever")]
    samples = tuple((now - 10.0 * (7 - k), max(0, live - (7 - k) * (i % 3))) for k in range(8))
    return Statistic("requests.Session" if i % 2 else "socket", None if i % 2 else "client",
                     CallSite(file, 10 + i, f"handler_{i}", False, tuple(tb)), live, live + 40, 40,
                     upstreams=((f"svc{i % 30}.internal:8080", live),), growth=_leaks.assess(samples),
                     samples=samples)


def test_page_of_1000_call_sites_is_small_and_draws(tmp_path: Path, browser: Any) -> None:
    now = 1_800_000_000.0
    snap = Snapshot(tuple(_site(i, 1 + (i * 7919) % 23) for i in range(1000)), now, 4242, "web-1", "api",
                    ("app.py",), now - 3600, 900, 1024, final=True)
    out = tmp_path / "big.html"
    out.write_text(render(histories([("web-1-4242.json", snap)]), now=now), encoding="utf-8")
    assert out.stat().st_size < 2_000_000  # how fast it opens is measured in benchmarks/run.py
    page = Page(browser, out)
    try:
        p = page.page
        assert page.errors == []
        assert p.locator(".fr.root").get_attribute("data-live") == str(snap.live)
        assert p.locator(".site").count() == 30  # the first 30 call sites; the rest on demand
        p.click("button.more")
        assert p.locator(".site").count() == 1000 and p.locator("svg.chart").count() >= 1000
        # A narrow site is found by search even where its bar is too thin to draw.
        p.fill("#cw-search", "handler_999")
        assert p.locator("#cw-matches").get_attribute("data-live") == str(1 + (999 * 7919) % 23)
    finally:
        page.close()


def test_hostile_names_stay_text(tmp_path: Path, browser: Any) -> None:
    evil = '</script><script>alert("x")</script><img src=x onerror=alert(1)>'
    now = 1_800_000_000.0
    st = Statistic("socket", "client", CallSite(f"/srv/{evil}.py", 3, evil, False, ((f"/srv/{evil}.py", 3, evil),)),
                   4, 4, 0, upstreams=((f"{evil}:1", 4),), retainers=(f"module app: {evil}[0]",))
    out = tmp_path / "evil.html"
    out.write_text(render(histories([("x.json", Snapshot((st,), now, 1, "h", evil, (evil,)))]), now=now),
                   encoding="utf-8")
    page = Page(browser, out)
    try:
        assert page.errors == [] and page.requests == [page.url]
        assert page.page.locator("img, script[src]").count() == 0
        assert page.page.locator(".fr[data-line='3']").get_attribute("data-func") == evil
        assert evil in page.page.locator(".site .where").inner_text()
        assert page.page.locator(".site ul.held li").all_inner_texts() == [f"module app: {evil}[0]"]
    finally:
        page.close()


def test_histories_and_page_data() -> None:
    """Files of one process are one history (newest counts, all samples); tracebacks outermost first."""
    site = CallSite("/app/a.py", 5, "f", False, (("/app/a.py", 5, "f"), ("/app/main.py", 9, "main")))

    def snap(t: float, live: int, pid: int = 7) -> Snapshot:
        samples = ((t - 2.0, live - 2), (t - 1.0, live - 1), (t, live))
        return Snapshot((Statistic("socket", "client", site, live, live, 0, samples=samples),), t, pid, "h",
                        started=100.0)

    hists = histories([("b", snap(20.0, 9)), ("a", snap(10.0, 5)), ("c", snap(10.0, 1, pid=8))])
    assert [[p for p, _ in h] for h in hists] == [["a", "b"], ["c"]]
    data = page_data(hists, now=30.0)
    proc = data["procs"][0]
    assert proc["files"] == 2 and proc["tot"][0] == 9
    row = proc["sites"][0]
    names = [data["strings"][data["frames"][i][2]] for i in row["tb"]]
    assert names == ["main", "f"] and row["tb"][-1] == row["f"]
    # Samples of both files, each reading once: (8,3) (9,4) (10,5) (18,7) (19,8) (20,9), from t0 = 10.
    assert row["s"] == [-2.0, 3, -1.0, 4, 0.0, 5, 8.0, 7, 9.0, 8, 10.0, 9]


def test_report_html_errors(tmp_path: Path) -> None:
    """An output that cannot be written, or a folder with nothing to show: a message and exit code 2."""
    site = CallSite("/app/a.py", 5, "f", False, (("/app/a.py", 5, "f"),))
    Snapshot((Statistic("socket", "client", site, 1, 1, 0),), 10.0, 7, "h").dump(str(tmp_path / "h-7.json"))
    proc = connwatch_cli("report", str(tmp_path), "--html", str(tmp_path / "missing" / "out.html"))
    assert proc.returncode == 2 and "cannot write" in proc.stderr and not (tmp_path / "missing").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = connwatch_cli("report", str(empty), "--html", str(tmp_path / "out.html"))
    assert proc.returncode == 2 and "no snapshot files" in proc.stderr and not (tmp_path / "out.html").exists()
    proc = connwatch_cli("report", str(tmp_path / "h-7.json"), "--html", str(tmp_path / "one.html"))
    assert proc.returncode == 0 and "1 process, 1 call site, 1 snapshot file," in proc.stdout
    assert "<title>connwatch report: pid 7</title>" in (tmp_path / "one.html").read_text(encoding="utf-8")
