"""Run the test suites of urllib3, requests, httpx and aiohttp with the agent on and off; the
same tests must pass.

    python tests/compat/run_compat.py [--venv .venv-compat] [--keep] [--only urllib3|requests|httpx|aiohttp]

Steps: fetch the source distributions of the versions installed in the project's venv
(``pip download --no-binary :all:``), build separate venvs with their test requirements, the
packages from those sources and this checkout (its wheel, so the ``connwatch.pth`` hook is
installed); run each suite twice with the same selection, once with ``CONNWATCH_ENABLED=1`` and
once without, each with a JUnit report; compare the outcomes per test. Tests that pass without
the agent and fail with it are re-run (both ways, twice) to tell flaky tests from real breakage.
Exit status 1 when any test still fails only with the agent.

urllib3, requests and httpx share one venv (``--venv``); aiohttp has its own (``<venv>-aiohttp``):
its test requirements bring pytest plugins (xdist, codspeed, mock) and pins the others do not
run with. aiohttp is built from its sdist with its C extensions (as its wheels have them), and
its suite runs on two pytest-xdist workers (the machines have two cores).

Only loopback and the package registry are reachable in CI: urllib3's and httpx's tests that
need the Internet are deselected with their own markers (``requires_network``, ``network``);
requests' tests run against local pytest-httpbin servers (a test that reaches the Internet fails
both ways, so compares equal); aiohttp's deselections are in :data:`AIOHTTP_DESELECT`.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_PER_TEST = "60"
SUITE_DEADLINE_S = 300


class Suite(NamedTuple):
    """One project's own test suite, run from its sdist."""

    venv: str  # "" for the shared venv, else the suffix of its own
    options: List[str]  # pytest options for every run of it (the suite's and the re-runs)
    selection: List[str]  # what the suite's run selects (the same both ways)
    deadline_s: int  # one run is killed after this
    extras: str = ""  # pip extras of the package installed from its source


# aiohttp's tests left out, the same both ways: none needs more than loopback (its proxy tests
# use a local proxy.py and a mocked resolver); these are the ones that are flaky on their own.
AIOHTTP_DESELECT: List[str] = []
AIOHTTP_MARKS = "not dev_mode and not autobahn and not internal"  # its own pytest.ini default

SUITES: Dict[str, Suite] = {
    "urllib3": Suite("", [], ["test", "-m", "not requires_network and not integration"], 300, "[socks]"),
    "requests": Suite("", [], ["tests"], 300, "[socks]"),
    "httpx": Suite("", [], ["tests", "-m", "not network"], 300, "[brotli,cli,http2,socks,zstd]"),
    # its pytest.ini's addopts (coverage, doctest-modules, xdist auto) replaced by what we run;
    # JUnit output without the captured logs of every passing test
    "aiohttp": Suite("aiohttp", ["-o", "addopts=", "-o", "junit_logging=no", "-o", "junit_log_passing_tests=false",
                                 "--strict-markers"],
                     ["-n", "2", "-m", AIOHTTP_MARKS, "tests", *[f"--deselect={t}" for t in AIOHTTP_DESELECT]],
                     1500),
}
# Test requirements not named in the sdists in a form pip reads (urllib3 keeps them in a PEP 735
# dependency group, requests in a requirements file with an editable self-install).
URLLIB3_FALLBACK = ["anyio[trio]>=4.8.0", "h2>=4.1.0", "httpx>=0.28.1", "hypercorn>=0.15.0", "pysocks>=1.7.1",
                    "pytest>=8.3.4", "pytest-socket>=0.7.0", "pytest-timeout>=2.3.1", "quart>=0.20.0",
                    "quart-trio>=0.12.0", "trio>=0.27.0"]
EXTRA = ["trustme", "cryptography", "idna", "pyopenssl", "pytest-timeout", "wrapt", "psutil"]
# httpx's sdist names no test requirements (its repository's requirements.txt does): these, with
# the extras it is installed with (chardet pinned as there: its encoding guesses are what the tests expect).
HTTPX_TEST_REQUIREMENTS = ["pytest", "trio", "trustme", "uvicorn", "cryptography", "chardet==5.2.0", "anyio",
                           "brotli", "click", "pygments", "rich", "h2", "socksio", "zstandard", "httpcore"]
# Lines of aiohttp's requirements/*.in it does not need here: the coverage plugin (addopts are
# replaced; coverage itself stays: its pytest.ini names a coverage warning class), type checking,
# the autobahn suite (deselected by its marker), a build-time helper.
AIOHTTP_SKIPPED = {"pytest-cov", "mypy", "python-on-whales", "setuptools-git"}

Outcome = str  # passed | failed | skipped


def sh(cmd: List[str], **kw: object) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload,no-any-return]


def installed_version(name: str) -> str:
    return metadata.version(name)


def urllib3_test_requirements(src: Path) -> List[str]:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ImportError:  # Python < 3.11
        return URLLIB3_FALLBACK
    data = tomllib.loads((src / "pyproject.toml").read_text())
    group = data.get("dependency-groups", {}).get("test")
    return [g for g in group if isinstance(g, str)] if group else URLLIB3_FALLBACK


def requests_test_requirements(src: Path) -> List[str]:
    out = []
    req = src / "requirements-dev.txt"
    for line in req.read_text().splitlines() if req.exists() else []:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-e") and not line.startswith("pytest-cov"):
            out.append(line)
    return out or ["pytest", "pytest-httpbin", "httpbin", "trustme"]


def httpx_test_requirements(src: Path) -> List[str]:
    return list(HTTPX_TEST_REQUIREMENTS)


def aiohttp_test_requirements(src: Path) -> List[str]:
    """requirements/test-common.in and base.in (with the files they include), unpinned."""
    out: List[str] = []
    seen = set()

    def read(path: Path) -> None:
        if path in seen or not path.exists():
            return
        seen.add(path)
        for line in path.read_text().splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("-r "):
                read(path.parent / line[3:].strip())
            elif line and not line.startswith(("#", "-")):
                name = re.split(r"[\s;\[<>=!~]", line, maxsplit=1)[0]
                if name.lower() not in AIOHTTP_SKIPPED:
                    out.append(line)

    for f in ("test-common.in", "base.in"):
        read(src / "requirements" / f)
    return out


REQUIREMENTS: Dict[str, Callable[[Path], List[str]]] = {
    "urllib3": urllib3_test_requirements, "requests": requests_test_requirements,
    "httpx": httpx_test_requirements, "aiohttp": aiohttp_test_requirements,
}


def fetch_sources(work: Path, names: List[str]) -> Dict[str, Path]:
    """The sdists of the versions installed in this venv, extracted into ``work``."""
    versions = {n: installed_version(n) for n in names}
    dl = work / "sdists"
    dl.mkdir(parents=True, exist_ok=True)
    sh([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", str(dl),
        *[f"{n}=={v}" for n, v in versions.items()]])
    srcs: Dict[str, Path] = {}
    for name, version in versions.items():
        (archive,) = glob.glob(str(dl / f"{name}-{version}.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work)  # the registry's own sdist of a pinned version
        srcs[name] = work / f"{name}-{version}"
    return srcs


def build_venv(venv: Path, srcs: Dict[str, Path]) -> None:
    """``venv`` with the test requirements of the suites ``srcs``, their packages from source."""
    if not (venv / "bin" / "python").exists():
        sh([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    sh([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    reqs = [r for name, src in srcs.items() for r in REQUIREMENTS[name](src)] + EXTRA
    sh([py, "-m", "pip", "install", "-q", *reqs])
    # The packages under test from their sources (non-editable), then this checkout's wheel
    # (with its connwatch.pth): none of them replaced by a dependency resolution later.
    sh([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
        *[str(src) + SUITES[name].extras for name, src in srcs.items()]])
    sh([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)])
    for name, src in srcs.items():
        if (src / name / "__init__.py").exists():
            # A package at the top of its sdist would be imported from there (``python -m pytest``
            # puts the folder first on sys.path) instead of the build just installed (aiohttp's
            # C extensions): set aside.
            (src / name).rename(src / f"{name}.source")


def venv_of(base: Path, name: str) -> Path:
    suffix = SUITES[name].venv
    return base.with_name(f"{base.name}-{suffix}") if suffix else base


def run_suite(venv: Path, src: Path, args: List[str], agent: bool, report: Path, snaps: Path,
              extra: Tuple[str, ...] = (), deadline_s: int = SUITE_DEADLINE_S) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONNWATCH_", "OTEL_", "PYTEST_"))}
    env.pop("PYTHONPATH", None)
    if agent:
        env.update(CONNWATCH_ENABLED="1", CONNWATCH_DIR=str(snaps), CONNWATCH_SNAPSHOT_INTERVAL="1")
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--timeout", TIMEOUT_PER_TEST, f"--junitxml={report}", "-o", "junit_family=xunit2", *args, *extra]
    print("+", "CONNWATCH_ENABLED=1" if agent else "(agent off)", " ".join(cmd), flush=True)
    if report.exists():
        report.unlink()
    # Output to a file, not a pipe: a worker thread a timed-out test left blocked can keep the
    # interpreter from exiting after the session (urllib3's http2 probe tests, under load).
    # The JUnit report is written when the session ends, so a run killed at its deadline still
    # has its results.
    log = report.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            code = proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            print(f"   (killed after {deadline_s} s: hung at exit)" if report.exists()
                  else f"   (killed after {deadline_s} s)", flush=True)
    text = log.read_text(errors="replace").replace("\0", "")
    return subprocess.CompletedProcess(cmd, code, text, "")


def outcomes(report: Path) -> Dict[str, Outcome]:
    out: Dict[str, Outcome] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result = "failed"
        elif case.find("skipped") is not None:
            result = "skipped"
        else:
            result = "passed"
        if out.get(name) != "failed":  # a test that errored in teardown after passing: failed
            out[name] = result
    return out


def count(results: Dict[str, Outcome]) -> Dict[str, int]:
    c = {"passed": 0, "failed": 0, "skipped": 0}
    for r in results.values():
        c[r] += 1
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(REPO / ".venv-compat"))
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--only", choices=sorted(SUITES), default=None)
    opts = ap.parse_args()
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="connwatch-compat-"))
    t0 = time.monotonic()
    broken: List[str] = []
    names = [opts.only] if opts.only else list(SUITES)
    try:
        srcs = fetch_sources(work, names)
        for venv in dict.fromkeys(venv_of(Path(opts.venv), n) for n in names):
            t1 = time.monotonic()
            build_venv(venv, {n: s for n, s in srcs.items() if venv_of(Path(opts.venv), n) == venv})
            print(f"   {venv.name} set up in {time.monotonic() - t1:.0f} s", flush=True)
        for name, src in srcs.items():
            suite = SUITES[name]
            venv = venv_of(Path(opts.venv), name)
            res: Dict[bool, Dict[str, Outcome]] = {}
            t1 = time.monotonic()
            for agent in (False, True):
                report = work / f"{name}-{'on' if agent else 'off'}.xml"
                proc = run_suite(venv, src, suite.options + suite.selection, agent, report,
                                 work / f"snapshots-{name}", deadline_s=suite.deadline_s)
                last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "(no output)"
                # Not a bare pytest summary line: CI reads the last one as this project's own result.
                print(f"   {name} suite with the agent {'on' if agent else 'off'} ended with <{last}>", flush=True)
                if not report.exists():
                    print(proc.stdout[-5000:])
                    broken.append(f"{name}: the suite did not run ({'on' if agent else 'off'})")
                    continue
                res[agent] = outcomes(report)
            if len(res) < 2:
                continue
            off, on = res[False], res[True]
            suspects = sorted(t for t, r in off.items() if r == "passed" and on.get(t) not in ("passed", None))
            missing = sorted(set(off) - set(on))
            confirmed = confirm(venv, src, suspects, work, name) if suspects else []
            print(f"== {name} {srcs[name].name.rsplit('-', 1)[1]}: without the agent {fmt(count(off))}; "
                  f"with CONNWATCH_ENABLED=1 {fmt(count(on))}; passing only without the agent: {len(suspects)} "
                  f"({len(suspects) - len(confirmed)} flaky on re-run), missing with the agent: {len(missing)}",
                  flush=True)
            snaps = sorted(glob.glob(str(work / f"snapshots-{name}" / "*.json")))
            print(f"   snapshot files written by the agent during the run: {len(snaps)}; "
                  f"{name} took {time.monotonic() - t1:.0f} s", flush=True)
            broken += [f"{name}: {t}" for t in confirmed] + [f"{name}: not run with the agent: {t}" for t in missing]
    finally:
        if not opts.keep and not opts.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"== compat run took {time.monotonic() - t0:.0f} s", flush=True)
    if broken:
        print("FAIL: tests that pass without connwatch and fail with it:")
        for b in broken:
            print("  ", b)
        return 1
    print("OK: every test that passes without connwatch passes with it")
    return 0


def fmt(c: Dict[str, int]) -> str:
    return f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"


def confirm(venv: Path, src: Path, suspects: List[str], work: Path, name: str) -> List[str]:
    """Re-run each suspect alone, twice each way: broken only if it fails every time with the
    agent and passes every time without it."""
    still = []
    for test in suspects:
        node = to_node_id(src, test)
        if node is None:
            still.append(test)
            continue
        ok_off = ok_on = 0
        for _ in range(2):
            for agent in (False, True):
                report = work / f"{name}-rerun.xml"
                run_suite(venv, src, [*SUITES[name].options, node], agent, report, work / "snapshots-rerun")
                result = outcomes(report).get(test) if report.exists() else None
                if result == "passed":
                    if agent:
                        ok_on += 1
                    else:
                        ok_off += 1
        if ok_on == 0 and ok_off == 2:
            still.append(test)
        print(f"   re-run {test}: passed {ok_off}/2 without, {ok_on}/2 with the agent", flush=True)
    return still


def to_node_id(src: Path, test: str) -> Optional[str]:
    """``pkg.mod.Class::name`` (JUnit) -> ``pkg/mod.py::Class::name`` (pytest)."""
    classname, _, func = test.partition("::")
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = Path(*parts[:i]).with_suffix(".py")
        if (src / path).exists():
            return "::".join([str(path), *parts[i:], func])
    return None


if __name__ == "__main__":
    sys.exit(main())
