"""The README's main job: the strongest sparse-vs-dense comparison that fits about 10 minutes on 2 cores.

    python -m experiments.compare                          # configs/regimes.py MAIN, tiny, seed 0
    python -m experiments.compare --seeds=0,1,2            # with its own error bar (3x the time)
    python -m experiments.compare --size=smoke --steps=20 --workdir_root=/tmp/compare

Trains the sparse model of a regime (configs/regimes.py; default MAIN, the regime docs/RESULTS.md found
strongest among those that fit) and its dense baseline matched on training FLOPs per token
(research.baselines.matched_dense: router and capacity slack paid for by a wider dense FFN), each seed in its
own workdir under --workdir_root (a rerun resumes or, when finished, just reports). Then prints the
table, the gap with its uncertainty and what it means, and writes <root>/val_loss.png and
<root>/comparison.json. With one seed, the uncertainty is the seed-to-seed spread of this regime
committed in docs/results/main/report.json (`research.verdict`) (3 seeds per model, `research.results --only=main`), when
that file holds the regime; the output says which figures this run measured and which it read there.

The layers run unrolled (`model.scan_layers=False`; `--scan_layers` keeps the regime's scanned
layout): the same function (tests/models/test_transformer.py, test_scan_equals_unrolled), with each
layer's weights drawn on their own rather than as one stacked draw, so a seed's initial weights differ
from a scanned run's, a sample of the same distribution as the committed seeds'. On this 2-core CPU
the 4-layer sparse step of MAIN ran 1.36x faster unrolled (20,819 against 15,288 tokens/s, 200 steps,
one process alone), for the main job's 10-minute budget; the scan exists to keep compile time flat
in depth, which at 4 layers it need not.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

from configs import regimes
from configs.sizes import SIZES
from moe import atomic_file
from moe.config.config_dict import experiment_from_config_dict
from moe.trainer import loop
from research import plots, statistics, sweep_plan, verdict

_ROOT = flags.DEFINE_string("workdir_root", "runs/compare", "Where the runs' workdirs go.")
_REGIME = flags.DEFINE_enum(
    "regime", regimes.MAIN, list(regimes.REGIMES), "configs/regimes.py key."
)
_SIZE = flags.DEFINE_enum("size", "tiny", list(SIZES), "Model size (configs.sizes.SIZES).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, comma-separated.")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps of every run (warm-up capped).")
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers", False, "Run the layers scanned, as the regime has them (default: unrolled)."
)


def _overrides(spec: str) -> tuple[str, ...]:
  layout = () if _SCAN_LAYERS.value else ("model.scan_layers=False",)
  if _STEPS.value is None:
    return layout
  warmup = min(sweep_plan.load_config(spec).train.warmup_steps, _STEPS.value)
  return layout + (f"train.steps={_STEPS.value}", f"train.warmup_steps={warmup}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  root = pathlib.Path(_ROOT.value)
  spec = f"configs/regimes.py:regime={_REGIME.value},size={_SIZE.value}"
  runs = sweep_plan.plan(
      [spec],
      seeds=[int(s) for s in _SEEDS.value],
      root=root,
      baselines=("active_flops",),
      overrides=_overrides(spec),
  )
  sweep_plan.write_manifest(root, runs)
  for run in sorted(runs, key=lambda r: (r.seed, r.match is None)):  # Dense first, as before.
    print(f"\n=== {run.name} seed {run.seed} in {run.workdir}", flush=True)
    loop.train_and_evaluate(experiment_from_config_dict(sweep_plan.config_of(run)), run.workdir)
  results = statistics.load_runs(root)
  summaries = [s for s in statistics.summarize(results) if s["name"] in {r.name for r in runs}]
  plots.loss_curves(
      [r for r in results if r.name in {s["name"] for s in summaries}],
      "steps",
      root / "val_loss.png",
      title=f"{_REGIME.value}: sparse vs dense at equal training FLOPs per token",
  )
  atomic_file.atomic_write(
      root / "comparison.json", json.dumps(statistics.json_ready(summaries), indent=1) + "\n"
  )
  sparse = next(s for s in summaries if s["match"] is None)
  dense = next(s for s in summaries if s["match"] == "active_flops")
  print(f"\nRegime {_REGIME.value}: {regimes.REGIMES[_REGIME.value].why}\n")
  print(statistics.markdown_table(summaries))
  print("\n" + verdict.verdict(sparse, dense))
  print(f"\nValidation loss curves: {root / 'val_loss.png'}; numbers: {root / 'comparison.json'}")


if __name__ == "__main__":
  app.run(main)
