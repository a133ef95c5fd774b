#!/usr/bin/env bash
# Sets up connwatch in .venv and runs the demo: a small service that leaks one HTTP client
# per request, driven by a load loop under `connwatch run`, then `connwatch report` names
# the leaking line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q --no-deps --force-reinstall . && .venv/bin/python -m pip install -q .

DEMO_DIR=.demo/snapshots
rm -rf "$DEMO_DIR"
echo "== running examples/leaky_service.py under connwatch (200 requests)"
.venv/bin/connwatch run --dir "$DEMO_DIR" -- .venv/bin/python examples/leaky_service.py --requests 200
echo
echo "== connwatch report $DEMO_DIR"
.venv/bin/connwatch report "$DEMO_DIR" --top 5
