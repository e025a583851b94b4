#!/usr/bin/env bash
# The sweeps behind docs/RESULTS.md, in order; resumable: rerun to continue where it stopped (complete
# runs are skipped, unfinished ones resume from their checkpoints). Then regenerate the tables:
#   bash experiments/results_sweeps.sh [FINDING ...]   # default: every finding, in this order
#   python -m experiments.results
# Each run is one CPU process using every core; 3 seeds per config (docs/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
SEEDS="${SEEDS:-0,1,2}"
export XLA_FLAGS="${XLA_FLAGS:-}"  # One CPU device: the sweeps measure models, not sharding.
sweep() { "$PY" -m experiments.sweep --seeds="$SEEDS" "$@"; }

a() {  # Sparse vs dense at equal training FLOPs per token: every regime of configs/regimes.py. Then
  # the main job's regime against its dense baselines matched on active and on total parameters (a
  # total-parameter baseline of the E=16 every-layer models is 16x wider: too slow for this CPU).
  for r in $("$PY" -c "import configs.regimes as r; print(*r.REGIMES)"); do
    sweep --config=configs/regimes.py:regime=$r --baselines=active_flops --root=runs/sweeps/regimes
  done
  main=$("$PY" -c "import configs.regimes as r; print(r.MAIN)")
  sweep --config=configs/regimes.py:regime=$main --baselines=active_params,total_params \
    --root=runs/sweeps/regimes
}
b() {  # Experts 2..32 at fixed active FLOPs (top-1, cf 1.25), with the dense tiny model for reference.
  sweep --config=configs/ablations.py:family=experts --config=configs/dense.py:size=tiny \
    --root=runs/sweeps/experts
}
c() {  # Capacity factor 1.0, 1.25, 2.0 and dropless (Switch Table 1).
  for m in 1.0 1.25 2.0 dropless; do
    sweep --config=configs/ablations.py:family=capacity,member=$m --root=runs/sweeps/capacity
  done
}
d() {  # Top-1 vs top-2 at equal steps, and top-1 trained for the top-2 run's training FLOPs (529 steps:
  # 400 x 8.07 / 6.11 GFLOPs per token, moe.accounting).
  for m in 1 2; do
    sweep --config=configs/ablations.py:family=topk,member=$m --root=runs/sweeps/topk
  done
  sweep --config=configs/ablations.py:family=topk,member=1 --set=train.steps=529 \
    --set=name=topk-1-equal-flops_tiny --root=runs/sweeps/topk
}
e() {  # Balance loss weight 0 vs 1e-2: collapse or not.
  for m in 0 1e-2; do
    sweep --config=configs/ablations.py:family=balance,member=$m --root=runs/sweeps/balance
  done
}

for finding in "${@:-a b c d e}"; do
  for f in $finding; do "$f"; done
done
