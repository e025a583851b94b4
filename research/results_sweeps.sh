#!/usr/bin/env bash
# The sweeps behind docs/RESULTS.md, in order; resumable: rerun to continue where it stopped (complete
# runs are skipped, unfinished ones resume from their checkpoints). Then regenerate the tables:
#   bash research/results_sweeps.sh [FINDING ...]   # default: findings a-e (issue 8), in this order;
#                                                    # serving, upcycle: issue 11; recipes: issue 22;
#                                                    # main: the main job's committed seeds
#   python -m research.results
# Each run is one CPU process using every core; 3 seeds per config (docs/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
SEEDS="${SEEDS:-0,1,2}"
export XLA_FLAGS="${XLA_FLAGS:-}"  # One CPU device: the sweeps measure models, not sharding.
sweep() { "$PY" -m research.sweep --seeds="$SEEDS" "$@"; }
reuse() {  # reuse SPEC DIR FROM_DIR... [-- --set=field=value ...]: each seed of config SPEC absent
  # from DIR (DIR/seed<N>) is copied from the first FROM_DIR holding it complete, when the configs
  # are equal but for the name (research.reuse_run checks; it refuses otherwise, and the
  # sweep then trains the run): the same model, data and schedule, retrained, ends bit-identical.
  local spec=$1 target=$2; shift 2
  local from=() sets=()
  while (($#)); do [[ $1 == -- ]] && { shift; sets=("$@"); break; }; from+=("$1"); shift; done
  for s in ${SEEDS//,/ }; do
    for f in "${from[@]}"; do
      [[ -e $target/seed$s ]] && break
      [[ -e $f/seed$s ]] && "$PY" -m research.reuse_run --source="$f/seed$s" --workdir="$target/seed$s" \
        --config="$spec" "${sets[@]}" || true
    done
  done
}

a() {  # Sparse vs dense at equal training FLOPs per token: every regime of configs/regimes.py. Then
  # the winning regime against its dense baseline matched on active parameters, and the main job's
  # (the same model, a quarter of the steps) on active and on total parameters (a total-parameter
  # baseline of the E=16 every-layer models is 7x the FLOPs: 4000 steps of it are too slow here).
  for r in $("$PY" -c "import configs.regimes as r; print(*r.REGIMES)"); do
    sweep --config=configs/regimes.py:regime=$r --baselines=active_flops --root=runs/sweeps/regimes
  done
  sweep --config=configs/regimes.py:regime=stdlib_d64_e16_every1_group4096 --baselines=active_params \
    --root=runs/sweeps/regimes
  base=$("$PY" -c "import configs.regimes as r; print(r.RECIPE_BASE)")
  sweep --config=configs/regimes.py:regime=$base --baselines=active_params,total_params \
    --root=runs/sweeps/regimes
}
main() {  # The main job's regime (configs/regimes.py MAIN, chosen in finding i) and its FLOPs-matched
  # dense baseline on seeds 3, 4, 5: not the seeds the recipe sweep chose it on.
  local main
  main=$("$PY" -c "import configs.regimes as r; print(r.MAIN)")
  "$PY" -m research.sweep --seeds=3,4,5 --config=configs/regimes.py:regime=$main \
    --baselines=active_flops --root=runs/sweeps/regimes
}
b() {  # Experts 2..32 at fixed active FLOPs (top-1, cf 1.25), with the dense tiny model for reference;
  # the whole batch (4096 tokens) per routing group, or at E=32 an expert would expect 4 tokens of a
  # 128-token group and chance alone would overflow it (finding a).
  reuse configs/dense.py:size=tiny runs/sweeps/experts/dense_tiny runs/sweeps/upcycle/dense_tiny
  sweep --config=configs/ablations.py:family=experts,group=4096 --config=configs/dense.py:size=tiny \
    --root=runs/sweeps/experts
  # E=8 and E=32 dropless: does E=32 still trail E=8 once no token is dropped?
  for e in 8 32; do
    sweep --config=configs/ablations.py:family=experts,member=$e,group=4096,capacity=dropless \
      --root=runs/sweeps/experts
  done
}
c() {  # Capacity factor 1.0, 1.25, 2.0 and dropless (Switch Table 1).
  reuse configs/ablations.py:family=capacity,member=1.25 runs/sweeps/capacity/capacity-1.25_tiny \
    runs/sweeps/topk/topk-1_tiny runs/sweeps/balance/balance-1e-2_tiny
  for m in 1.0 1.25 2.0 dropless; do
    sweep --config=configs/ablations.py:family=capacity,member=$m --root=runs/sweeps/capacity
  done
}
d() {  # Top-1 vs top-2 at equal steps, and top-1 trained for the top-2 run's training FLOPs (529 steps:
  # 400 x 8.07 / 6.11 GFLOPs per token, moe.accounting).
  reuse configs/ablations.py:family=topk,member=1 runs/sweeps/topk/topk-1_tiny \
    runs/sweeps/capacity/capacity-1.25_tiny runs/sweeps/balance/balance-1e-2_tiny
  reuse configs/ablations.py:family=topk,member=2 runs/sweeps/topk/topk-2_tiny \
    runs/sweeps/serving_order/top2-rank_major_tiny
  for m in 1 2; do
    sweep --config=configs/ablations.py:family=topk,member=$m --root=runs/sweeps/topk
  done
  sweep --config=configs/ablations.py:family=topk,member=1 --set=train.steps=529 \
    --set=name=topk-1-equal-flops_tiny --root=runs/sweeps/topk
}
e() {  # Balance loss weight 0 vs 1e-2: collapse or not.
  reuse configs/ablations.py:family=balance,member=1e-2 runs/sweeps/balance/balance-1e-2_tiny \
    runs/sweeps/topk/topk-1_tiny runs/sweeps/capacity/capacity-1.25_tiny
  for m in 0 1e-2; do
    sweep --config=configs/ablations.py:family=balance,member=$m --root=runs/sweeps/balance
  done
}

serving() {  # Issue 11: top-2 decoder routing with the rank-major (GShard) vs token-major (causal) fill order.
  reuse configs/top2.py:size=tiny runs/sweeps/serving_order/top2-rank_major_tiny \
    runs/sweeps/topk/topk-2_tiny -- \
    --set=model.moe.serving_order=rank_major --set=name=top2-rank_major_tiny \
    --set=model.moe.allow_noncausal_routing=True
  for o in rank_major token_major; do
    sweep --config=configs/top2.py:size=tiny --set=model.moe.serving_order=$o --set=name=top2-$o"_tiny" \
      --set=model.moe.allow_noncausal_routing=True --root=runs/sweeps/serving_order
  done
}
recipes() {  # Issue 22 (docs/routing.md): the recipe families of configs/ablations.py on RECIPE_BASE
  # (stdlib_d64_e16_every1_group4096_1000), 3 seeds each, into one root. Every family's first member
  # is the base's config, so it runs once (recipe_balance's member loss) and the other families sweep
  # their other members; score stands on granularity G = 2, whose softmax member is granularity:2's
  # config (sigmoid gates need k >= 2), so it too sweeps only its sigmoid members; the base's dense
  # baseline is in runs/sweeps/regimes (finding a). 11 configs x 3 seeds, each about the base's
  # sparse run time. Exactly (PY=.venv/bin/python, SEEDS=0,1,2):
  #   .venv/bin/python -m research.sweep --seeds=0,1,2 --root=runs/sweeps/recipes \
  #     --config=configs/ablations.py:family=recipe_balance \
  #     --config=configs/ablations.py:family=score,member=sigmoid \
  #     --config=configs/ablations.py:family=score,member=sigmoid_bias \
  #     --config=configs/ablations.py:family=balance_scope,member=group512 \
  #     --config=configs/ablations.py:family=balance_scope,member=global512 \
  #     --config=configs/ablations.py:family=granularity,member=2 \
  #     --config=configs/ablations.py:family=granularity,member=4 \
  #     --config=configs/ablations.py:family=granularity,member=8 \
  #     --config=configs/ablations.py:family=shared,member=shared128
  #   .venv/bin/python -m research.report runs/sweeps/recipes
  local specs=(--config=configs/ablations.py:family=recipe_balance)
  for m in score:sigmoid score:sigmoid_bias balance_scope:group512 balance_scope:global512 \
    granularity:2 granularity:4 granularity:8 shared:shared128; do
    specs+=("--config=configs/ablations.py:family=${m%%:*},member=${m#*:}")
  done
  sweep "${specs[@]}" --root=runs/sweeps/recipes
}
complete() {  # Whether the run in workdir $1 of config spec $2 is complete (research.sweep_plan.is_complete).
  "$PY" -c "import sys; from research import sweep_plan as p
sys.exit(not p.is_complete(p.Run('', 0, sys.argv[2], (), None, None, sys.argv[1], p.load_config(sys.argv[2]).train.steps)))" "$@"
}
upcycle() {  # Issue 11: a dense tiny run of 400 steps, then 200 more as itself or upcycled to top-2 of 8
  # (configs/upcycle.py); same fresh schedule and batches, so the arms differ only in the model. A
  # third arm continues the dense model for the upcycled arm's training FLOPs: 256 steps, 200 x
  # 7,288,320 / 5,703,168 FLOPs per token (sparse / dense arm, moe.accounting).
  local root=runs/sweeps/upcycle
  local arms=("upcycle_dense_tiny arm=dense" "upcycle_sparse_tiny arm=sparse"
    "upcycle_dense-equal-flops_tiny arm=dense,steps=256")
  reuse configs/dense.py:size=tiny $root/dense_tiny runs/sweeps/experts/dense_tiny
  for s in ${SEEDS//,/ }; do
    local base=$root/dense_tiny/seed$s
    complete "$base" configs/dense.py:size=tiny || "$PY" -m experiments.train --config=configs/dense.py:size=tiny \
      --config.train.seed=$s --workdir="$base"
    for a in "${arms[@]}"; do
      local name=${a% *} spec=configs/upcycle.py:size=tiny,${a#* } w=$root/${a% *}/seed$s
      complete "$w" "$spec" || "$PY" -m experiments.train --config="$spec" --config.name="$name" \
        --config.train.seed=$s --config.train.init_from="$base" --workdir="$w"
    done
  done
  # The manifest pairs the arms, so that the report gives the upcycled arm's gap to each dense one.
  "$PY" - "$root" "$SEEDS" <<'PY'
import sys
from research import sweep_plan as sweep
root, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
arms = [  # (name, spec, match, baseline_of)
    ("dense_tiny", "configs/dense.py:size=tiny", None, None),
    ("upcycle_sparse_tiny", "configs/upcycle.py:size=tiny,arm=sparse", None, None),
    ("upcycle_dense_tiny", "configs/upcycle.py:size=tiny,arm=dense", "continued", "upcycle_sparse_tiny"),
    ("upcycle_dense-equal-flops_tiny", "configs/upcycle.py:size=tiny,arm=dense,steps=256",
     "continued_equal_flops", "upcycle_sparse_tiny"),
]
runs = []
for name, spec, match, of in arms:
  cd = sweep.load_config(spec)
  for s in seeds:
    init = () if name == "dense_tiny" else (f"train.init_from={root}/dense_tiny/seed{s}",)
    init += (f"name={name}",) if cd.name != name else ()  # As launched: --config.name.
    runs.append(sweep.Run(name, s, spec, init, match, of, f"{root}/{name}/seed{s}", cd.train.steps))
sweep.write_manifest(root, runs)
PY
}

for finding in "${@:-a b c d e}"; do
  for f in $finding; do "$f"; done
done
