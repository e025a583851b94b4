#!/usr/bin/env bash
# Downloads into .whl/ the wheels that tokamax needs and the GPU image lacks (the image has jax 0.11.2,
# flax, triton, jaxtyping, tqdm, treescope, protobuf; it reaches no package index). Run it here, where
# PyPI is reachable; benchmarks/gpu_kernels.sh installs .whl/*.whl on the GPU machine when the run
# carries it (carry=[".whl"]). Versions are the ones `pip install tokamax==0.0.17` chose on 2026-11-26.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
for spec in tokamax==0.0.17 qwix==0.1.8 einshape==1.0 immutabledict==4.3.1 fire==0.7.1 \
  termcolor==3.3.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 xprof==2.24.2 jax-triton==0.4.1; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec" 2>&1 | { grep -v "^WARNING: Location" || true; }
done
du -sh .whl
