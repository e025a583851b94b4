#!/usr/bin/env bash
# The grouped-matmul kernels on one GPU, in one call of about 9 minutes: the correctness check of every
# MoE layer path on the device, then the layer table at two shapes, written to benchmarks/results/
# under the card's name.
#
#   bash benchmarks/gpu_kernels.sh            # on the GPU machine, from the repository root
#
# 1. `--check_only --probe_tokamax`: which tokamax kernel runs each matmul direction on this card, then
#    every path's outputs and gradients against the einsum path (float32 and bfloat16, nothing drops).
# 2. The layer table, bf16, forward+backward, against a dense FFN with d_ff = k * f, top-2, E = 8 and
#    E = 64, capacity paths at cf = 1.0 (gather): T=16384, d=2048, f=4096 (`--preset=gpu`), then
#    T=32768, d=4096, f=8192 (`--preset=gpu-large`, without dropless-xla: XLA's ragged_dot is a dense
#    dot over every expert there, minutes and tens of GB at E = 64).
# Each (shape, E) is its own process under its own time limit, so one that runs out of memory or time
# loses only itself; every measurement is logged as it is made ("# measured ...").
#
# tokamax and jax_triton are not in the GPU image. Fetch their wheels here first (PyPI reachable):
#   bash benchmarks/gpu_wheels.sh             # -> .whl/ (about 37 MB, ignored by git)
# and pass carry=[".whl"] to the device run: this script installs them into /tmp/site. Without them the
# tokamax path is skipped with a line saying why.
#
# Time limits (seconds) can be changed: CHECK_S, SMALL_S, LARGE_S (per E). PYTHON: the interpreter
# (default python3, the image's, which has jax 0.11.2 with CUDA, flax and triton).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
CHECK_S="${CHECK_S:-100}"
SMALL_S="${SMALL_S:-110}"
LARGE_S="${LARGE_S:-130}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

card="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
slug="$(echo "$card" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/_/g' -e 's/_$//')"
out="benchmarks/results/moe_layer_kernels_${slug:-unknown}.txt"
{
  echo "# bash benchmarks/gpu_kernels.sh on ${card} ($(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  "$PY" - <<'EOF'
import importlib.metadata as md
names = ("jax", "jaxlib", "flax", "tokamax", "jax-triton", "triton")
def version(name):
  try:
    return md.version(name)
  except md.PackageNotFoundError:
    return "absent"
print("# " + ", ".join(f"{n} {version(n)}" for n in names))
EOF
} | tee "$out"

bench() {  # bench SECONDS ARGS...: one benchmark process, its output and exit status logged.
  local limit="$1"
  shift
  echo "# python -m benchmarks.moe_layer $*" | tee -a "$out"
  timeout "$limit" "$PY" -m benchmarks.moe_layer "$@" 2>&1 | tee -a "$out"
  local status="${PIPESTATUS[0]}"
  [ "$status" -eq 0 ] || echo "# exit status ${status} (124: over its ${limit} s limit)" | tee -a "$out"
}

dropless="dropless-tokamax,dropless-pallas"  # Comma-separated: --paths is a list flag.
bench "$CHECK_S" --check_only --probe_tokamax "--paths=gather,dropless-auto,dropless-xla,$dropless"
for experts in 8 64; do
  bench "$SMALL_S" --preset=gpu --top_k=2 "--experts=$experts" --capacity_factor=1.0 --iters=10 \
    "--paths=dense,gather,dropless-xla,$dropless"
done
for experts in 8 64; do
  bench "$LARGE_S" --preset=gpu-large --top_k=2 "--experts=$experts" --capacity_factor=1.0 \
    --iters=10 "--paths=dense,gather,$dropless"
done
if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi
echo "# written to $out"
