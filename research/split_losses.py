"""Each complete run of a sweep scored on held-out documents and on training documents: how much of a
model's loss is what it learnt of the documents it read rather than of the corpus.

    python -m research.split_losses --root=runs/sweeps/scaling --output=docs/results/scaling

For every complete run of the root (`research.statistics.load_runs`), the latest checkpoint is scored
on the run's own evaluation windows (`train.eval_batches`, `train.eval_windows`) of the validation
split and of the training split (`moe.trainer.evaluation`, read-only), the training windows parted by
whether the run's steps drew them. Writes `split_losses.json` (per run) and `split_losses.md` (per
config: mean over seeds of each loss, and validation minus unseen training windows). Built-in
corpora only: a TFDS training split is not scored.
"""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
from absl import app, flags

from moe import atomic_file
from moe.config.train import EvalWindows
from moe.data import corpora
from moe.trainer import evaluation
from research import statistics


def score_run(run: statistics.RunResult) -> dict:
  """The run's validation loss and its training-split losses (all, drawn, not drawn)."""
  spread = run.cfg.train.eval_windows is EvalWindows.SPREAD
  kw = dict(spread=spread, num_batches=run.cfg.train.eval_batches)
  held_out = evaluation.score(run.workdir, run.cfg, **kw)
  train = evaluation.score(run.workdir, run.cfg, split=corpora.TRAIN, **kw)
  drawn = evaluation.trained_on(train, run.cfg)
  return {
      "name": run.name,
      "seed": run.seed,
      "step": held_out.step,
      "validation": held_out.loss,
      "train": train.loss,
      "train_drawn": train.where(drawn).loss if drawn.any() else None,
      "train_not_drawn": train.where(~drawn).loss if (~drawn).any() else None,
      "drawn_windows": int(drawn.sum()),
      "windows": len(drawn),
  }


def table(rows: list[dict]) -> str:
  """Markdown, a line per config in the order of `rows`: means over its seeds."""
  by_name = collections.defaultdict(list)
  for row in rows:
    by_name[row["name"]].append(row)
  mean = lambda rs, key: np.mean([r[key] for r in rs if r[key] is not None])
  lines = [
      "| config | seeds | held-out documents | training documents, windows not trained on | "
      "windows trained on | held-out minus not trained on |",
      "|---|---|---|---|---|---|",
  ]
  for name, rs in by_name.items():
    val, unseen = mean(rs, "validation"), mean(rs, "train_not_drawn")
    lines.append(
        f"| {name} | {len(rs)} | {val:.4f} | {unseen:.4f} | {mean(rs, 'train_drawn'):.4f} |"
        f" {val - unseen:+.4f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  runs = [r for r in statistics.load_runs(flags.FLAGS.root) if r.complete]
  rows = []
  for run in runs:
    rows.append(score_run(run))
    print(f"{run.name} seed {run.seed}: {json.dumps(rows[-1])}", flush=True)
  out = pathlib.Path(flags.FLAGS.output)
  out.mkdir(parents=True, exist_ok=True)
  atomic_file.atomic_write(out / "split_losses.json", json.dumps(rows, indent=1) + "\n")
  atomic_file.atomic_write(out / "split_losses.md", table(rows))
  print(table(rows))


if __name__ == "__main__":
  # Defined only when run: a module that tests import must not add absl flags (a global registry).
  flags.DEFINE_string("root", None, "The sweep root.", required=True)
  flags.DEFINE_string("output", None, "Directory for split_losses.{json,md}.", required=True)
  app.run(main)
