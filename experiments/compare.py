"""The README's main job: a Switch model against its dense baseline matched on training FLOPs per token.

    python -m experiments.compare                      # tiny: dense vs switch-8, ~10 min on 2 CPU cores
    python -m experiments.compare --size=smoke --steps=20 --workdir_root=/tmp/compare

Trains `configs/switch.py:size=<size>,experts=8` and `configs/dense.py:size=<size>,match=switch8` (the
dense model with the same training FLOPs per token as the switch model, `moe.baselines.matched_dense`),
each in its own workdir under --workdir_root (a rerun resumes or, when finished, just reports), then
prints a table and writes <workdir_root>/val_loss.png and <workdir_root>/comparison.json.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags

import configs.dense
import configs.switch
from configs.sizes import SIZES
from moe import accounting, files, train
from moe.config_dict import experiment_from_config_dict
from moe.workdir import read_metrics

_ROOT = flags.DEFINE_string("workdir_root", "runs/compare", "Where the two runs' workdirs go.")
_SIZE = flags.DEFINE_enum("size", "tiny", list(SIZES), "Model size (configs.sizes.SIZES).")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps of both runs.")

EXPERTS = 8


def eval_curve(workdir: pathlib.Path) -> tuple[list[int], list[float]]:
  """(steps, validation losses) from a run's metrics.jsonl."""
  records = [r for r in read_metrics(workdir / "metrics.jsonl") if r.get("split") == "eval"]
  return [r["step"] for r in records], [r["loss"] for r in records]


def plot(curves: dict[str, tuple[list[int], list[float]]], path: pathlib.Path) -> None:
  """Validation loss against steps, one line per run, to a PNG (written atomically)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (steps, losses) in curves.items():
    ax.plot(steps, losses, marker="o", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Switch vs dense, matched training FLOPs per token")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = path.with_name(f".{path.stem}.tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  tmp.replace(path)


def table(rows: list[dict]) -> str:
  """The comparison as a Markdown table."""
  header = (
      "run",
      "total params",
      "active params",
      "train GFLOPs/token",
      "val loss",
      "val ppl",
      "tokens/s",
      "train time",
      "wall (this call)",
  )
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = (
        r["name"],
        f"{r['total_params'] / 1e6:.2f}M",
        f"{r['active_params'] / 1e6:.2f}M",
        f"{r['train_flops_per_token'] / 1e9:.4f}",
        f"{r['eval_loss']:.4f}",
        f"{r['eval_perplexity']:.2f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['train_time_s']:.1f} s",
        f"{r['wall_s']:.1f} s",
    )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  root = pathlib.Path(_ROOT.value)
  root.mkdir(parents=True, exist_ok=True)
  sparse = configs.switch.get_config(f"size={_SIZE.value},experts={EXPERTS}")
  dense = configs.dense.get_config(f"size={_SIZE.value},match=switch{EXPERTS}")
  rows, curves = [], {}
  for cd in (dense, sparse):
    if _STEPS.value is not None:  # A shorter run keeps its warmup within it.
      cd.train.steps = _STEPS.value
      cd.train.warmup_steps = min(cd.train.warmup_steps, _STEPS.value)
    cfg = experiment_from_config_dict(cd)
    workdir = root / cfg.name
    print(f"\n=== {cfg.name} in {workdir}", flush=True)
    start = time.perf_counter()
    final = train.train_and_evaluate(cfg, str(workdir))
    counts = accounting.param_counts(cfg.model)
    rows.append(
        dict(
            name=cfg.name,
            workdir=str(workdir),
            steps=final["step"],
            total_params=counts.total,
            active_params=counts.active,
            train_flops_per_token=accounting.flops_per_token(cfg.model, cfg.train.seq_len).total,
            eval_loss=final.get("eval_loss", float("nan")),
            eval_perplexity=final.get("eval_perplexity", float("nan")),
            tokens_per_s=final["tokens_per_s"],
            train_time_s=final["train_time_s"],
            compile_time_s=final["compile_time_s"],
            wall_s=time.perf_counter() - start,
        )
    )
    curves[cfg.name] = eval_curve(workdir)
  plot(curves, root / "val_loss.png")
  files.atomic_write(root / "comparison.json", json.dumps(rows, indent=2) + "\n")
  print("\n" + table(rows))
  print(f"\nValidation loss curves: {root / 'val_loss.png'}; numbers: {root / 'comparison.json'}")


if __name__ == "__main__":
  app.run(main)
