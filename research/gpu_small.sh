#!/usr/bin/env bash
# Issue 8 on one GPU: finding a at the `small` size (d 512, 8 layers, 64 x 512 tokens a step, bf16):
# the E=16 every-layer Switch model routed in 4096-token groups (configs/regimes.py
# stdlib_e16_every1_group4096) against its dense baseline matched on training FLOPs per token,
# Python stdlib, seeds 0-2, each seed's pair before the next seed. Packs the sweep root (metrics,
# configs, logs; no checkpoints) into $OUT/gpu_small.tgz; here, unpack it into runs/sweeps/gpu_small
# and run `python -m research.results --only=gpu_small`.
#
#   bash research/gpu_small.sh            # on the GPU machine (device tool: carry [".whl"])
#
# .whl/ holds what the GPU image lacks: `bash benchmarks/gpu_train_steps.sh wheels` fetches it.
# Environment: STEPS (600), WARMUP (60), BASELINES (active_flops), SEEDS ("0 1 2"), BUDGET_S
# (seconds after which no new seed starts; 420), ROOT (runs/sweeps/gpu_small: relative, so that the
# manifest's workdirs hold here too).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
STEPS="${STEPS:-600}"
WARMUP="${WARMUP:-60}"
BASELINES="${BASELINES:-active_flops}"
SEEDS="${SEEDS:-0 1 2}"
BUDGET_S="${BUDGET_S:-420}"
OUT="${OUT:-/tmp/gpu_small_out}"
ROOT="${ROOT:-runs/sweeps/gpu_small}"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import jax, sysconfig
print('jax', jax.__version__, jax.devices(), 'stdlib', sysconfig.get_paths()['stdlib'])"

start=$(date +%s)
for s in $SEEDS; do
  if [ $(($(date +%s) - start)) -gt "$BUDGET_S" ]; then
    echo "# budget: seed $s not started"
    break
  fi
  "$PY" -m research.sweep --root="$ROOT" --seeds="$s" --baselines="$BASELINES" \
    --config=configs/regimes.py:regime=stdlib_e16_every1_group4096,size=small \
    --set=train.steps="$STEPS" --set=train.warmup_steps="$WARMUP" \
    --set=train.eval_every=$((STEPS / 4)) --set=train.checkpoint_every="$STEPS"
  # One archive (the device tool returns few files), rewritten after every seed: what finished
  # comes back even if a later run is cut off.
  (cd "$ROOT" && find . -path '*/checkpoints' -prune -o -path '*/tensorboard' -prune \
    -o -type f -print | tar -czf "$OUT/gpu_small.tgz" -T -)
  echo "# seed $s done at $(($(date +%s) - start)) s"
done
