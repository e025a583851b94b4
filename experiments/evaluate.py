"""Re-scores a trained run's latest checkpoint on a chosen evaluation, without writing to its workdir.

    python -m experiments.evaluate --workdir=runs/r                  # the run's own evaluation
    python -m experiments.evaluate --workdir=runs/r --eval=all       # the whole validation split
    python -m experiments.evaluate --workdir=runs/r --eval=spread:64 --compare=runs/dense \
        --output=/tmp/r.json
    python -m experiments.evaluate --workdir=runs/r --split=train    # training documents

--eval: `spread:N` (N global batches of windows spread evenly over the split), `prefix:N` (the
first N batches, how the split was scored before `train.eval_windows` existed), `all` (every
window); default: the run's own `train.eval_batches` and `train.eval_windows`. Prints the loss, the
tokens scored, the loss of the even and odd windows and the standard error of a bootstrap over
the split's documents (`moe.trainer.evaluation`); with --compare, the gap to another run scored on the
same windows and its paired bootstrap error. --output writes the numbers, with every window's loss
and document, as JSON (never into a workdir). --split=train scores the same windows of the
training split (built-in corpora) and prints the loss of those the run's steps drew and of those
they did not: against the validation loss, what the model learnt of the documents it read
rather than of the corpus.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import app, flags

from moe import atomic_file
from moe.config.train import EvalWindows
from moe.data import corpora
from moe.trainer import evaluation, trained_run


def parse_eval(text: str | None, cfg) -> tuple[bool, int | None]:
  """(spread, num_batches) of an --eval value; None: the run's own evaluation."""
  if text is None:
    if cfg.train.eval_batches == 0:
      raise ValueError("the run was trained without evaluation (train.eval_batches=0): pass --eval")
    return cfg.train.eval_windows is EvalWindows.SPREAD, cfg.train.eval_batches
  if text == "all":
    return True, None
  kind, _, count = text.partition(":")
  if kind not in ("spread", "prefix") or not count.isdigit() or int(count) < 1:
    raise ValueError(f"--eval={text!r} must be spread:N, prefix:N (N >= 1 batches) or all")
  return kind == "spread", int(count)


def _summary(name: str, scored: evaluation.Scored, trained_W: np.ndarray | None = None) -> dict:
  even, odd = scored.halves
  drawn = {}
  if trained_W is not None:
    drawn = {
        f"{key}_{what}": value
        for key, part in (("trained_windows", trained_W), ("untrained_windows", ~trained_W))
        for what, value in (
            ("count", int(part.sum())),
            ("loss", scored.where(part).loss if part.any() else None),
        )
    }
  return {
      "workdir": name,
      "step": scored.step,
      "loss": scored.loss,
      "tokens": scored.tokens,
      "windows": len(scored.window_W),
      "split_windows": scored.num_windows,
      "documents": scored.num_documents,
      "loss_even_windows": even,
      "loss_odd_windows": odd,
      "halves_se": abs(even - odd) / 2,
      "document_bootstrap_se": evaluation.document_bootstrap(scored),
      **drawn,
  }


def _print(s: dict) -> None:
  print(
      f"{s['workdir']} (checkpoint {s['step']}): loss {s['loss']:.4f} on {s['tokens']:,} tokens"
      f" ({s['windows']:,} of {s['split_windows']:,} windows, {s['documents']} documents)\n"
      f"  halves {s['loss_even_windows']:.4f} / {s['loss_odd_windows']:.4f} (sampling SE ~"
      f" {s['halves_se']:.4f}); bootstrap over documents: SE {s['document_bootstrap_se']:.4f}"
  )
  if "trained_windows_count" in s:
    loss = lambda v: "-" if v is None else f"{v:.4f}"
    print(
        f"  windows its steps drew: {s['trained_windows_count']:,}, loss"
        f" {loss(s['trained_windows_loss'])}; the others: {s['untrained_windows_count']:,}, loss"
        f" {loss(s['untrained_windows_loss'])}"
    )


def _inside_a_workdir(path: pathlib.Path, workdirs: list[str]) -> bool:
  return any(pathlib.Path(w).resolve() in path.resolve().parents for w in workdirs)


def _score(workdir: str, cfg, spread: bool, num_batches: int | None, split: str):
  """(scored, its summary, on the training split which windows it trained on) of one run."""
  scored = evaluation.score(workdir, cfg, spread=spread, num_batches=num_batches, split=split)
  trained_W = evaluation.trained_on(scored, cfg) if split == corpora.TRAIN else None
  summary = _summary(workdir, scored, trained_W)
  _print(summary)
  return scored, summary, trained_W


def run(
    workdir: str,
    eval_text: str | None,
    compare: str | None,
    output: str | None,
    split: str = corpora.VALIDATION,
) -> dict:
  workdirs = [workdir] + ([compare] if compare else [])
  if output and _inside_a_workdir(pathlib.Path(output), workdirs):
    raise ValueError(f"--output={output} is inside a run's workdir; write it elsewhere")
  cfg = trained_run.load_config(workdir)
  spread, num_batches = parse_eval(eval_text, cfg)
  scored, summary, trained_W = _score(workdir, cfg, spread, num_batches, split)
  result = {"eval": eval_text or "the run's own", "split": split, "runs": [summary]}
  windows = {workdir: (scored, trained_W)}
  if compare:
    other_cfg = trained_run.load_config(compare)
    other, other_summary, other_trained_W = _score(compare, other_cfg, spread, num_batches, split)
    result["runs"].append(other_summary)
    gap, se = evaluation.paired_bootstrap(scored, other)
    result["gap"] = {"gap": gap, "document_bootstrap_se": se}
    print(f"gap {gap:+.4f} ± {se:.4f} (paired bootstrap over documents)")
    windows[compare] = (other, other_trained_W)
  if output:
    result["windows"] = {
        name: {
            "window": s.window_W.tolist(),
            "document": s.document_W.tolist(),
            "ce": s.ce_W.tolist(),
            "tokens": s.tokens_W.tolist(),
            **({} if trained is None else {"trained": trained.tolist()}),
        }
        for name, (s, trained) in windows.items()
    }
    atomic_file.atomic_write(pathlib.Path(output), json.dumps(result) + "\n")
  return result


def define_flags() -> None:
  """The command line's flags, defined when it runs: a module that tests import must not add
  flags (absl's registry is global: another module's --output would clash, a required flag would
  break every other absl program of the process)."""
  flags.DEFINE_string("workdir", None, "The run to re-score.", required=True)
  flags.DEFINE_string("eval", None, "spread:N | prefix:N | all (default: the run's own).")
  flags.DEFINE_string("compare", None, "Another run, scored on the same windows.")
  flags.DEFINE_string("output", None, "Write the numbers and per-window losses as JSON.")
  flags.DEFINE_enum(
      "split", corpora.VALIDATION, [corpora.VALIDATION, corpora.TRAIN], "The split to score."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    f = flags.FLAGS
    run(f.workdir, f.eval, f.compare, f.output, f.split)
  except ValueError as error:
    sys.exit(f"experiments.evaluate: {error}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
