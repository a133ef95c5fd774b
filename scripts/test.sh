#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs them all:
# a venv (.venv), the project installed from source with its test extras, lint and types,
# then pytest. Extra arguments go to pytest (e.g. scripts/test.sh -k socket).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
APT_UPDATED=""
# apt_install PACKAGE...: Debian packages (apt-get update first, once per run); fails without apt-get.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -q || return 1; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@"
}
IN_CI=""; case "${CI:-}" in 1|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]) IN_CI=1;; esac

# Debian's prometheus (prometheus + promtool) for the exporter and ops-kit tests; only when missing.
if ! command -v promtool >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: no apt-get: install prometheus/promtool yourself; their tests skip outside CI (and fail in CI)"
  else
    apt_install prometheus || echo "warning: could not install prometheus; its tests skip outside CI (and fail in CI)"
  fi
fi

# Debian's chromium for the HTML report's browser test (driven by Playwright from the test extra,
# never with a browser of Playwright's own); only when missing.
if [ ! -x /usr/bin/chromium ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: no apt-get: install chromium yourself; the HTML report's browser tests skip outside CI (and fail in CI)"
  else
    apt_install chromium || echo "warning: could not install chromium; the HTML report's browser tests skip outside CI (and fail in CI)"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

# A C compiler for the optional C extension (connwatch/_speedups.c); without one the package builds
# pure Python (its tests then skip outside CI, fail in CI). libc6-dev: gcc only recommends it.
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  apt_install gcc libc6-dev || echo "warning: could not install gcc: connwatch builds without its C extension"
fi
# Python.h: pyenv and python.org builds ship it; Debian's own python3 needs python3-dev.
if ! .venv/bin/python -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  if [ "$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')" = /usr ]; then
    apt_install python3-dev || echo "warning: could not install python3-dev: connwatch builds without its C extension"
  else
    echo "warning: this interpreter has no Python.h: connwatch builds without its C extension"
  fi
fi
# In CI a build that silently falls back to pure Python fails instead.
if [ -n "$IN_CI" ]; then export CONNWATCH_REQUIRE_EXTENSIONS=1; fi

.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".[test,bench]"
# A real (non-editable) install, rebuilt every run: subprocess tests need the wheel's
# connwatch.pth in site-packages, and must run this checkout's code.
.venv/bin/python -m pip install -q --no-deps --force-reinstall .
# The tests import connwatch from this checkout, not from site-packages: the C extension is
# built next to its source too (git-ignored), so that the main pytest run uses it.
.venv/bin/python hatch_build.py --inplace
if [ -n "$IN_CI" ]; then
  # the installed copy (from outside the checkout) loads its C extension
  VENV_PY="$PWD/.venv/bin/python"
  (cd / && "$VENV_PY" -c "import connwatch._speedups as s; assert 'site-packages' in s.__file__, s")
fi

echo "== ruff"; .venv/bin/ruff check connwatch tests examples benchmarks sitecustomize_example hatch_build.py
echo "== mypy"; .venv/bin/mypy
if [ "$#" -eq 0 ]; then
  # urllib3's and requests' own test suites, with the agent on and off: the same tests pass.
  # (Before our own pytest, so that the last test-runner summary printed is this project's.)
  echo "== compat"; .venv/bin/python tests/compat/run_compat.py
fi
echo "== pytest"; .venv/bin/python -m pytest "$@"
if [ "$#" -eq 0 ]; then
  # The same agent without its C extension (the fallback every platform without a compiler gets):
  # the core, the client patches (their Python wrappers) and the registry-stressing reliability
  # tests again (about 70 s). Not the packaging tests: they build wheels, whatever the runtime uses.
  echo "== pytest (pure Python)"
  CONNWATCH_PURE_PYTHON=1 .venv/bin/python -m pytest -q tests/core tests/patches tests/reliability \
    --ignore=tests/core/test_packaging.py
fi
# The core, patch and reliability tests again on every other CPython 3.9-3.13 (C and pure Python;
# each version in its own .venv-3.X, two at a time): in CI all must be there and green.
if [ "$#" -eq 0 ]; then
  echo "== other CPython versions"; MAIN_PYTHON=.venv/bin/python bash scripts/test_versions.sh
fi
# The benchmark is not a test: a quick run only shows it still runs (timings are not checked).
if [ "$#" -eq 0 ]; then
  echo "== benchmark (quick)"; .venv/bin/python benchmarks/run.py --quick > /dev/null
  .venv/bin/python benchmarks/retainers.py --quick > /dev/null
fi
