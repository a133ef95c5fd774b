#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs them all:
# a venv (.venv), the project installed from source with its test extras, lint and types,
# then pytest. Extra arguments go to pytest (e.g. scripts/test.sh -k socket).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian's prometheus (prometheus + promtool) for the exporter and ops-kit tests; only when missing.
if ! command -v promtool >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus; } \
      || echo "warning: could not install prometheus; its tests skip outside CI (and fail in CI)"
  else
    echo "warning: no apt-get: install prometheus/promtool yourself; their tests skip outside CI (and fail in CI)"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".[test,bench]"
# A real (non-editable) install, rebuilt every run: subprocess tests need the wheel's
# connwatch.pth in site-packages, and must run this checkout's code.
.venv/bin/python -m pip install -q --no-deps --force-reinstall .

echo "== ruff"; .venv/bin/ruff check connwatch tests examples benchmarks sitecustomize_example
echo "== mypy"; .venv/bin/mypy
if [ "$#" -eq 0 ]; then
  # urllib3's and requests' own test suites, with the agent on and off: the same tests pass.
  # (Before our own pytest, so that the last test-runner summary printed is this project's.)
  echo "== compat"; .venv/bin/python tests/compat/run_compat.py
fi
echo "== pytest"; .venv/bin/python -m pytest "$@"
# The benchmark is not a test: a quick run only shows it still runs (timings are not checked).
if [ "$#" -eq 0 ]; then
  echo "== benchmark (quick)"; .venv/bin/python benchmarks/run.py --quick > /dev/null
fi
