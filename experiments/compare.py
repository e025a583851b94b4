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
committed in docs/results/main/report.json (3 seeds per model, `research.results --only=main`), when
that file holds the regime; the output says which figures this run measured and which it read there.
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
from moe.trainer import loop, workdir
from research import plots, statistics, sweep_plan

_ROOT = flags.DEFINE_string("workdir_root", "runs/compare", "Where the runs' workdirs go.")
_REGIME = flags.DEFINE_enum(
    "regime", regimes.MAIN, list(regimes.REGIMES), "configs/regimes.py key."
)
_SIZE = flags.DEFINE_enum("size", "tiny", list(SIZES), "Model size (configs.sizes.SIZES).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, comma-separated.")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps of every run (warm-up capped).")

COMMITTED = (
    pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "main" / "report.json"
)


def _overrides(spec: str) -> tuple[str, ...]:
  if _STEPS.value is None:
    return ()
  warmup = min(sweep_plan.load_config(spec).train.warmup_steps, _STEPS.value)
  return (f"train.steps={_STEPS.value}", f"train.warmup_steps={warmup}")


def committed(sparse: str, dense: str) -> tuple[dict, dict] | None:
  """The committed summaries (seeds, final_std, gaps) of the two configs, or None."""
  if not COMMITTED.exists():
    return None
  report = workdir.from_json_safe(workdir.read_json(COMMITTED))
  by_name = {c["name"]: c for c in report["configs"]}
  pair = by_name.get(sparse), by_name.get(dense)
  # No spread: a config missing, or one seed (NaN; null in reports written before NaN was a string).
  if None in pair or any(c.get("final_std") is None or math.isnan(c["final_std"]) for c in pair):
    return None
  return pair


def verdict(sparse: dict, dense: dict) -> str:
  """The gap, its uncertainty, where each figure comes from, and one sentence saying what it means."""
  g = sparse["gaps"]["active_flops"]
  seeds = f"{len(sparse['seeds'])} vs {len(dense['seeds'])} seeds"
  lines = [
      f"Measured in this run: gap (sparse - dense) = {g['gap']:+.4f} nats per token ({seeds})."
  ]
  se = g["se"]
  pair = committed(sparse["name"], dense["name"])
  if pair is not None:
    c_sparse, c_dense = pair
    c_gap = c_sparse["gaps"]["active_flops"]
    lines.append(
        f"Committed in {COMMITTED.relative_to(COMMITTED.parents[3])}: gap {c_gap['gap']:+.4f} ±"
        f" {c_gap['se']:.4f} ({c_gap['gap'] / c_gap['se']:+.1f}σ, {len(c_sparse['seeds'])} vs"
        f" {len(c_dense['seeds'])} seeds); seed spread of the final loss {c_sparse['final_std']:.4f}"
        f" (sparse) and {c_dense['final_std']:.4f} (dense)."
    )
  if math.isnan(se):
    if pair is None:
      lines.append(
          "No committed seed spread for this regime: run with --seeds=0,1,2 for an error bar."
      )
      return "\n".join(lines)
    # One seed each: the gap is the difference of two single draws, each with the committed spread.
    se = math.hypot(pair[0]["final_std"], pair[1]["final_std"])
    source = "the committed seed spread"
  else:
    source = "this run's seeds"
  sigma = g["gap"] / se if se > 0 else math.inf
  lines.append(f"This run's gap is {sigma:+.1f} standard errors ({se:.4f}, from {source}).")
  if abs(sigma) < 3:
    lines.append("Not resolved: the gap is within 3 standard errors of seed noise at this budget.")
  elif g["gap"] < 0:
    lines.append(
        f"Resolved: the sparse model reaches a lower validation loss than a dense model given the"
        f" same training FLOPs per token, by {-g['gap']:.3f} nats per token."
    )
  else:
    lines.append(
        f"Resolved: the sparse model is worse than a dense model given the same training FLOPs per"
        f" token, by {g['gap']:.3f} nats per token."
    )
  return "\n".join(lines)


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
