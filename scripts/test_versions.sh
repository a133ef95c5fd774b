#!/usr/bin/env bash
# The version matrix: the core, patch and reliability tests on every CPython 3.9-3.13 this
# machine has, other than the main venv's (scripts/test.sh runs that one), with the C extension
# built for each and again with CONNWATCH_PURE_PYTHON=1.
#
#   bash scripts/test_versions.sh [3.X ...]     (default: 3.9 3.10 3.11 3.12 3.13)
#
# An interpreter is found in pyenv's versions folder (${PYENV_ROOT:-$HOME/.pyenv}/versions/3.X.N,
# the newest patch release) or as python3.X on PATH. Each gets its own venv (.venv-3.X, git-ignored)
# with the project's test extra, this checkout installed as a wheel (subprocess tests load its
# connwatch.pth) and connwatch/_speedups.cpython-3X-*.so built in place (the ABI tag in the name lets
# one .so per version sit side by side). Two versions run at a time (the machines have two cores),
# each one's output captured and printed whole when it ends.
# Outside CI a missing version is skipped with a line saying so; with CI=true every one must be
# present and green. MAIN_PYTHON (default .venv/bin/python) names the interpreter left out.
set -euo pipefail
cd "$(dirname "$0")/.."
IN_CI=""; case "${CI:-}" in 1|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]) IN_CI=1;; esac
if [ -n "$IN_CI" ]; then export CONNWATCH_REQUIRE_EXTENSIONS=1; fi
JOBS=${CONNWATCH_VERSION_JOBS:-2}
VERSIONS=("$@"); [ "${#VERSIONS[@]}" -gt 0 ] || VERSIONS=(3.9 3.10 3.11 3.12 3.13)
MAIN_PY=${MAIN_PYTHON:-.venv/bin/python}
MAIN_MINOR=""
if [ -x "$MAIN_PY" ]; then MAIN_MINOR=$("$MAIN_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); fi
TESTS=(tests/core tests/patches tests/reliability)

# find_python 3.X: prints the path of a working CPython 3.X, or nothing.
find_python() {
  local v=$1 p cands=()
  local root=${PYENV_ROOT:-$HOME/.pyenv}/versions
  # pyenv: the newest 3.X.N folder (not 3.X.Nt free-threaded or -dev builds)
  while IFS= read -r d; do cands+=("$d/bin/python$v"); done < <(
    ls -d "$root/$v".* 2>/dev/null | grep -E "/$v\.[0-9]+\$" | sort -t. -k3 -n -r)
  if command -v "python$v" >/dev/null 2>&1; then cands+=("$(command -v "python$v")"); fi
  for p in "${cands[@]}"; do
    # a pyenv shim exists for versions pyenv does not have selected: ask the interpreter itself
    if [ -x "$p" ] && [ "$("$p" -c 'import sys, platform; print("%d.%d" % sys.version_info[:2],
platform.python_implementation())' 2>/dev/null)" = "$v CPython" ]; then
      echo "$p"; return 0
    fi
  done
}

# pip PYTHON ARGS...: pip without the warnings about the machine's missing local index folders.
pip() {
  local py=$1 out rc=0; shift
  out=$("$py" -m pip "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v "^WARNING: Location '.*' is ignored" || true
  return $rc
}

# run_version 3.X PYTHON LOG: venv, install, build, both test passes; output to LOG.
run_version() {
  local v=$1 py=$2 venv=".venv-$1"
  set -e
  local t0=$SECONDS
  echo "== $v: $py ($("$py" -c 'import platform; print(platform.python_version())'))"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  pip "$venv/bin/python" install -q --upgrade pip
  pip "$venv/bin/python" install -q ".[test]"
  pip "$venv/bin/python" install -q --no-deps --force-reinstall .
  "$venv/bin/python" hatch_build.py --inplace
  # the C extension this version loads, from the checkout (the tests) and from site-packages
  # (subprocesses started outside it)
  "$venv/bin/python" -c "import connwatch._accel as a, sys; assert a.speedups is not None or not sys.argv[1], \
'no C extension'; print('   C extension:', a.speedups and a.speedups.__file__)" "$IN_CI"
  if [ -n "$IN_CI" ]; then
    local vpy="$PWD/$venv/bin/python"
    (cd / && "$vpy" -c "import connwatch._speedups as s; assert 'site-packages' in s.__file__, s")
  fi
  echo "   set-up took $((SECONDS - t0)) s"
  local rc=0 t1=$SECONDS
  echo "== $v pytest (C extension)"
  "$venv/bin/python" -m pytest -q "${TESTS[@]}" || rc=1
  echo "   took $((SECONDS - t1)) s"; t1=$SECONDS
  echo "== $v pytest (pure Python)"
  CONNWATCH_PURE_PYTHON=1 "$venv/bin/python" -m pytest -q "${TESTS[@]}" \
    --ignore=tests/core/test_packaging.py || rc=1
  echo "   took $((SECONDS - t1)) s; $v in all $((SECONDS - t0)) s"
  return $rc
}

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/connwatch-versions.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT
T0=$SECONDS
failed=(); missing=(); ran=()
declare -A PIDS=()
# wait_one: waits for the oldest running version, prints its log, records its result.
wait_one() {
  local v=${ran[0]}
  ran=("${ran[@]:1}")
  local rc=0
  wait "${PIDS[$v]}" || rc=$?
  cat "$LOGS/$v.log"
  if [ "$rc" -eq 0 ]; then echo "== $v: green"; else failed+=("$v"); echo "== $v: FAILED"; fi
}
for v in "${VERSIONS[@]}"; do
  if [ "$v" = "$MAIN_MINOR" ]; then echo "== $v: the main venv's version (scripts/test.sh tests it)"; continue; fi
  py=$(find_python "$v")
  if [ -z "$py" ]; then
    missing+=("$v")
    echo "== $v: no CPython $v on this machine (pyenv versions folder or python$v on PATH): skipped"
    continue
  fi
  while [ "${#ran[@]}" -ge "$JOBS" ]; do wait_one; done
  run_version "$v" "$py" > "$LOGS/$v.log" 2>&1 &
  PIDS[$v]=$!
  ran+=("$v")
done
while [ "${#ran[@]}" -gt 0 ]; do wait_one; done
echo "== version matrix took $((SECONDS - T0)) s"
if [ -n "$IN_CI" ] && [ "${#missing[@]}" -gt 0 ]; then
  echo "FAIL: CI must test every CPython 3.9-3.13; missing: ${missing[*]}"; exit 1
fi
if [ "${#failed[@]}" -gt 0 ]; then echo "FAIL: versions with failures: ${failed[*]}"; exit 1; fi
