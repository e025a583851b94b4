#!/usr/bin/env bash
# The whole-model table: configs/dense.py:size=base and its switch / top-2 counterparts (bf16,
# the base size's dtype) side by side on one GPU, by benchmarks.train_step. Writes
# benchmarks/results/train_step_<card>.json (the rows) and .txt (the table and how it was made), and
# copies both with the full log to $OUT when it is set (the device tool's return folder).
#
#   benchmarks/gpu_train_steps.sh wheels   # here, with the network: the wheels the GPU image lacks
#   benchmarks/gpu_train_steps.sh          # on the GPU (device tool: carry [".whl"]), ~2-3 minutes
#
# The GPU image has jax, flax, optax, orbax and absl but not ml-collections (config files) or grain (moe.data,
# which the config builders import) with its array-record and portpicker, nor tensorboardX (what
# experiments.train logs to, for research/gpu_small.sh): `wheels` downloads them into
# .whl/ (git-ignored) and the run installs them into /tmp/site from there.
#
# Batch: the base size trains 256 x 1024 tokens a step, which does not fit one 80 GB card without
# rematerialisation (jax.nn.dot_product_attention's XLA path keeps the full L x L probabilities; the CPU
# compile of experiments.compile_check counts about 1.7 GiB per sequence at float32). The table runs
# BATCHES' first size that every config fits (32 x 1024 = 32k tokens a step, then 16), the same for all
# rows. Environment: PYTHON (python3), BATCHES ("32 16"), STEPS (20), WARMUP (5), CONFIG (the dense
# spec), RESULTS (benchmarks/results), CARD (from nvidia-smi).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ "${1:-}" = "wheels" ]; then
  # Versions as pinned by this project's .venv on 2026-11-26 (pure Python, except array-record).
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
  exit $?
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import ml_collections, grain" 2>/dev/null || {
  echo "gpu_train_steps.sh: ml_collections or grain is missing: run '$0 wheels' here and carry .whl" >&2
  exit 1
}

if [ -z "${CARD:-}" ]; then
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
  # "NVIDIA H100 80GB HBM3" -> h100, as the other result files are named.
  CARD=$(echo "${name#NVIDIA }" | awk '{print tolower($1)}' | tr -c 'a-z0-9\n' '_')
  CARD="${CARD:-cpu}"
fi
CONFIG="${CONFIG:-configs/dense.py:size=base}"
RESULTS="${RESULTS:-benchmarks/results}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-5}"
# The pool may grow to 90% of the card (JAX's default is 75%); each config runs in its own process.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
json="$RESULTS/train_step_$CARD.json"
txt="$RESULTS/train_step_$CARD.txt"
log="$(mktemp)"

status=1
for batch in ${BATCHES:-32 16}; do
  command=("$PYTHON" -m benchmarks.train_step "--config=$CONFIG" --sparse_counterparts
    "--batch=$batch" "--steps=$STEPS" "--warmup=$WARMUP" "--json=$json")
  echo "+ ${command[*]}" | tee -a "$log"
  # stdout holds the combined table alone; the children's output and the compile logs go to stderr.
  "${command[@]}" 2> >(tee -a "$log" >&2) | tee "$txt.table"
  status=${PIPESTATUS[0]}
  cat "$txt.table" >>"$log"
  [ "$status" -eq 0 ] && break
  echo "gpu_train_steps.sh: a config failed at batch $batch (exit $status)" | tee -a "$log"
done

{
  echo "# benchmarks/gpu_train_steps.sh, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# ${name:-$CARD}; ${command[*]}"
  cat "$txt.table"
} >"$txt"
rm -f "$txt.table"
cat "$txt"
if [ -n "${OUT:-}" ]; then
  cp "$json" "$txt" "$OUT"/ 2>/dev/null
  cp "$log" "$OUT/train_step_$CARD.log"
fi
rm -f "$log"
exit "$status"
