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
measured in docs/results/regimes/report.json (3 seeds per model), when that file is there.
"""

from __future__ import annotations

import json
import math
import pathlib

from absl import app, flags

from configs import regimes
from configs.sizes import SIZES
from moe import atomic_file
from moe.config.config_dict import experiment_from_config_dict
from moe.trainer import loop
from research import plots, statistics, sweep_plan

_ROOT = flags.DEFINE_string("workdir_root", "runs/compare", "Where the runs' workdirs go.")
_REGIME = flags.DEFINE_enum(
    "regime", regimes.MAIN, list(regimes.REGIMES), "configs/regimes.py key."
)
_SIZE = flags.DEFINE_enum("size", "tiny", list(SIZES), "Model size (configs.sizes.SIZES).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, comma-separated.")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps of every run (warm-up capped).")

MEASURED = (
    pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "regimes" / "report.json"
)


def _overrides(spec: str) -> tuple[str, ...]:
  if _STEPS.value is None:
    return ()
  warmup = min(sweep_plan.load_config(spec).train.warmup_steps, _STEPS.value)
  return (f"train.steps={_STEPS.value}", f"train.warmup_steps={warmup}")


def measured_spread(sparse: str, dense: str) -> tuple[float, float] | None:
  """(sparse, dense) seed standard deviations of the final loss from docs/RESULTS.md's regimes sweep."""
  if not MEASURED.exists():
    return None
  stds = {c["name"]: c.get("final_std") for c in json.loads(MEASURED.read_text())["configs"]}
  if stds.get(sparse) is None or stds.get(dense) is None:
    return None
  return stds[sparse], stds[dense]


def verdict(sparse: dict, dense: dict) -> str:
  """The gap, its uncertainty and one sentence saying what it means."""
  g = sparse["gaps"]["active_flops"]
  source = f"{len(sparse['seeds'])} vs {len(dense['seeds'])} seeds"
  se = g["se"]
  if math.isnan(se):
    spread = measured_spread(sparse["name"], dense["name"])
    if spread is None:
      return (
          f"gap (sparse - dense) = {g['gap']:+.4f} nats per token, one seed each and no measured"
          " spread for this regime: run with --seeds=0,1,2 for an error bar."
      )
    se = math.hypot(*spread)  # One seed each: the difference of two single draws.
    source = f"one seed each; seed spread {spread[0]:.4f} / {spread[1]:.4f} from {MEASURED.name}"
  sigma = g["gap"] / se if se > 0 else math.inf
  head = (
      f"gap (sparse - dense) = {g['gap']:+.4f} ± {se:.4f} nats per token ({sigma:+.1f}σ; {source})."
  )
  if abs(sigma) < 2:
    meaning = "The two are indistinguishable at this budget: the gap is within seed noise."
  elif g["gap"] < 0:
    meaning = (
        f"The sparse model reaches a lower validation loss than a dense model given the same"
        f" training FLOPs per token, by {-g['gap']:.3f} nats per token."
    )
  else:
    meaning = (
        f"The sparse model is worse than a dense model given the same training FLOPs per token, by"
        f" {g['gap']:.3f} nats per token."
    )
  return f"{head}\n{meaning}"


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
  print("\n" + verdict(sparse, dense))
  print(f"\nValidation loss curves: {root / 'val_loss.png'}; numbers: {root / 'comparison.json'}")


if __name__ == "__main__":
  app.run(main)
