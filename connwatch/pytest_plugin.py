"""pytest plugin: fail a test that leaves new live network clients behind.

Opt in with ``pytest --connwatch`` or ``connwatch = true`` in the ini file; otherwise the
plugin does nothing but register its marker. For each test, the baseline is taken after the
test's fixtures are set up and the check runs after they are torn down, so a fixture that
opens a client in setup and closes it in teardown is fine, and so are module- and
session-scoped fixtures. Clients the test leaves open fail it, naming each call site
``file:line (function)`` with its traceback.

    @pytest.mark.connwatch(allow=1)                       # one new client is expected
    @pytest.mark.connwatch(allow={"socket/listener": 1})  # per kind or "file:line" glob
    @pytest.mark.connwatch(check=False)                   # do not check this test
    @pytest.mark.connwatch(max_created=5)                 # no call site may build more than 5
                                                          # clients in this test, closed or not

ini options: ``connwatch_grace`` (seconds to wait for asynchronous closes, default 0.5),
``connwatch_ignore`` (glob patterns of known call sites or kinds, one per line),
``connwatch_max_created`` (the default ``max_created`` of every test; unset: no churn check).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Generator, List, Optional, Tuple

import pytest

from . import _guard, _snapshot
from ._guard import Churned, Leak

_BASELINE = pytest.StashKey[Optional[_snapshot.Snapshot]]()
_LEAKS = pytest.StashKey[List[Leak]]()
_CHURN = pytest.StashKey[Tuple[List[Churned], int]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("connwatch", "connection leaks (connwatch)")
    group.addoption("--connwatch", action="store_true", default=None,
                    help="fail tests that leave new live network clients behind")
    group.addoption("--connwatch-grace", type=float, default=None, metavar="S",
                    help="seconds to wait for clients closed asynchronously (default 0.5)")
    parser.addini("connwatch", "check every test for leaked network clients", type="bool", default=False)
    parser.addini("connwatch_grace", "seconds to wait for clients closed asynchronously", default="0.5")
    parser.addini("connwatch_ignore", "glob patterns of call sites (file:line) or kinds never reported",
                  type="linelist", default=[])
    parser.addini("connwatch_max_created", "fail a test in which one call site creates more clients than this "
                  "(closed or not: a client built per call); empty: no such check", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "connwatch(allow=0, check=True, max_created=None): clients this test may leave (a number, kind or "
        "file:line globs, or {pattern: n}); check=False skips the connwatch leak check; max_created=N fails the "
        "test when one call site creates more than N clients, closed or not",
    )
    enabled = config.getoption("connwatch") or config.getini("connwatch")
    if not enabled:
        return
    grace = config.getoption("connwatch_grace")
    if grace is None:
        try:
            grace = float(config.getini("connwatch_grace"))
        except ValueError:
            raise pytest.UsageError(f"connwatch_grace must be a number of seconds, "
                                    f"not {config.getini('connwatch_grace')!r}") from None
    raw = str(config.getini("connwatch_max_created") or "").strip()
    max_created: Optional[int] = None
    if raw:
        try:
            max_created = int(raw)
            if max_created < 0:
                raise ValueError(raw)
        except ValueError:
            raise pytest.UsageError(f"connwatch_max_created must be a whole number 0 or more, not {raw!r}") from None
    plugin = LeakChecker(grace, tuple(config.getini("connwatch_ignore")), max_created)
    config.pluginmanager.register(plugin, "connwatch-checker")


class LeakChecker:
    """The active part of the plugin, registered only when the check is on."""

    def __init__(self, grace: float, ignore: Tuple[str, ...], max_created: Optional[int] = None) -> None:
        self.grace = grace
        self.ignore = ignore
        self.max_created = max_created
        self.started_agent = _guard.ensure_enabled()
        import connwatch

        self.agent_file = connwatch.snapshot_path() if self.started_agent else None
        self.checked = 0
        self.leaky: List[Tuple[str, List[Leak]]] = []
        self.churny: List[Tuple[str, List[Churned]]] = []
        self.gc_released = 0

    def _marker(self, item: pytest.Item) -> Tuple[bool, Any, Optional[int]]:
        mark = item.get_closest_marker("connwatch")
        if mark is None:
            return True, 0, self.max_created
        check = mark.kwargs.get("check", mark.args[0] if mark.args and isinstance(mark.args[0], bool) else True)
        max_created = mark.kwargs.get("max_created", self.max_created)
        if max_created is not None and (isinstance(max_created, bool) or not isinstance(max_created, int)
                                        or max_created < 0):
            raise pytest.UsageError(f"{item.nodeid}: connwatch(max_created=...) must be a whole number 0 or more, "
                                    f"not {max_created!r}")
        return bool(check), mark.kwargs.get("allow", 0), max_created

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, Any, None]:
        outcome = yield
        # After setup: what fixtures opened for this test is the baseline, not a leak.
        ok = outcome.excinfo is None and self._marker(item)[0]
        item.stash[_BASELINE] = _snapshot.take() if ok else None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item,
                                  call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
        outcome = yield
        if call.when == "call" and outcome.get_result().failed:
            item.stash[_BASELINE] = None  # a failed test may skip its cleanup: its failure says enough

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        # trylast: runs after pytest's own teardown hook, so function fixtures are closed.
        before = item.stash.get(_BASELINE, None)
        if before is None:
            return
        item.stash[_BASELINE] = None
        _check, allow, max_created = self._marker(item)
        leaks, after = _guard.check(before, allow, self.ignore, self.grace)
        self.checked += 1
        self.gc_released += max(0, after.gc_released - before.gc_released)
        if leaks:
            item.stash[_LEAKS] = leaks
            self.leaky.append((item.nodeid, leaks))
        churned = _guard.find_churn(before, after, max_created, self.ignore)
        if churned and max_created is not None:
            item.stash[_CHURN] = (churned, max_created)
            self.churny.append((item.nodeid, churned))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Optional[pytest.Item]) -> bool:
        # The leak is only known after teardown, when pytest would already have logged the
        # test as passed. So run the three phases unlogged, turn a passed call into the
        # test's failure when it leaked, then log the reports (the pattern rerun plugins use).
        from _pytest.runner import runtestprotocol

        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        leaks = item.stash.get(_LEAKS, None)
        churn = item.stash.get(_CHURN, None)
        if leaks or churn:
            parts = [_guard.format_leaks(leaks, "this test")] if leaks else []
            if churn:
                parts.append(_guard.format_churn(churn[0], churn[1], "this test"))
            for report in reports:
                if report.when == "call" and report.passed and not hasattr(report, "wasxfail"):
                    report.outcome = "failed"
                    report.longrepr = "\n".join(parts)
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        tr.section("connwatch")
        leaked = sum(x.count for _n, leaks in self.leaky for x in leaks)
        if not self.leaky:
            tr.write_line(f"connwatch: {self.checked} tests checked, no leaked network clients")
        else:
            tr.write_line(f"connwatch: {self.checked} tests checked, {len(self.leaky)} left {leaked} live "
                          f"client{'s' if leaked != 1 else ''} behind", red=True, bold=True)
            sites: Dict[str, int] = {}
            for _nodeid, leaks in self.leaky:
                for x in leaks:
                    key = f"{x.label()} at {x.where()}"
                    sites[key] = sites.get(key, 0) + x.count
            for nodeid, leaks in self.leaky:
                tr.write_line(f"  {nodeid}: " + ", ".join(f"+{x.count} {x.label()} at {x.where()}" for x in leaks))
            tr.write_line("call sites, most leaked first:")
            for key, n in sorted(sites.items(), key=lambda kv: -kv[1])[:10]:
                tr.write_line(f"  {n:>5}  {key}")
        for nodeid, churned in self.churny:
            tr.write_line(f"  {nodeid}: " + ", ".join(f"{c.created} {c.label()} created at {c.where()}"
                                                     for c in churned), red=True)
        if self.gc_released:
            tr.write_line(f"connwatch: {self.gc_released} client(s) were released only by garbage collection "
                          "(never closed) during checked tests")

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if not self.started_agent:
            return

        from connwatch import bootstrap

        bootstrap.stop(final_write=False)
        if self.agent_file:  # the snapshot file of a test run is not wanted in the folder
            try:
                os.unlink(self.agent_file)
            except OSError:
                pass
