"""Aggregates a sweep over seeds: prints the table, writes it as Markdown and JSON, and draws the plots.

    python -m research.report runs/sweeps/experts
    python -m research.report runs/sweeps/experts --out=docs/results/experts --heatmap=experts-16_tiny

Writes to --out (default <root>/report): statistics.md, statistics.json, val_loss_steps.png, val_loss_flops.png,
val_loss_wall.png (validation loss against steps, cumulative training FLOPs and wall-clock; seeds as a
band), expert_load.png (expert x step per sparse layer, for the --heatmap config's lowest seed; default
the first sparse config) and dropped.png (dropped fraction per sparse layer over steps). Statistics:
see research/statistics.py. Runs still in progress are listed as pending and left out of the statistics.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

from moe import atomic_file
from research import frontier, plots, scaling_fit, statistics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _as_committed(root) -> str:
  """The sweep root as a report names it: relative to the repository when inside it (the reports
  are committed; an absolute path would name one machine)."""
  path = pathlib.Path(root).absolute()
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(root)


_OUT = flags.DEFINE_string("out", None, "Output directory (default <root>/report).")
_HEATMAP = flags.DEFINE_string("heatmap", None, "Config whose expert load is drawn.")


def write_report(root: pathlib.Path, out: pathlib.Path, heatmap: str | None = None) -> str:
  """Writes every output of one sweep root to `out`; returns the Markdown table."""
  runs = statistics.load_runs(root)
  if not runs:
    raise ValueError(f"{root}: no runs (no */seed*/config.json and no sweep.json)")
  summaries = statistics.summarize(runs)
  table = statistics.markdown_table(summaries)
  payload = {"root": _as_committed(root), "configs": summaries}
  complete = [r for r in runs if r.complete]  # A run in progress would bend its config's band.
  leverage = frontier.multipliers(runs)
  out.mkdir(parents=True, exist_ok=True)
  if leverage.get("configs"):
    payload["multipliers"] = leverage
    table += "\n\nCompute multiplier against the dense frontier:\n\n"
    table += frontier.markdown_table(leverage)
    plots.frontier(complete, leverage, out / "frontier.png")
    plots.multipliers(leverage, out / "multipliers.png")
  joint = _joint_fit(summaries)
  if joint is not None:
    payload["scaling_fit"] = joint
    table += "\n\n" + _fit_text(joint)
  atomic_file.atomic_write(out / "report.md", table + "\n")
  atomic_file.atomic_write(
      out / "report.json", json.dumps(statistics.json_ready(payload), indent=1) + "\n"
  )
  for axis in plots.LOSS_AXES:
    plots.loss_curves(complete, axis, out / f"val_loss_{axis}.png")
  sparse = [r for r in runs if r.cfg.model.moe is not None and r.cfg.model.num_sparse_layers]
  if heatmap is not None and not any(r.name == heatmap for r in sparse):
    raise ValueError(f"--heatmap={heatmap}: not a sparse config of {root}")
  chosen = sorted(
      (r for r in sparse if r.name == (heatmap or sparse[0].name)), key=lambda r: r.seed
  )
  if chosen:
    plots.load_heatmap(chosen[0], out / "expert_load.png")
  plots.dropped_per_layer(runs, out / "dropped.png")
  return table


def _joint_fit(summaries: list[dict]) -> dict | None:
  """Clark et al.'s law fitted to the configs' mean final losses, when the sweep varies only the
  model (one corpus, one schedule, one batch) and its points determine the fit; else None."""
  done = [s for s in summaries if s["seeds"]]
  if len({(s["steps"], s["tokens_per_step"], s["data"]) for s in done}) != 1:
    return None
  n = [s["active_non_embedding_params"] for s in done]
  e = [s["experts"] for s in done]
  try:
    fitted = scaling_fit.fit(n, e, [s["final_mean"] for s in done])
  except ValueError:
    return None
  return {
      "n": "active non-embedding parameters",
      "coefficients": dict(zip(scaling_fit.COEFFICIENTS, fitted.coefficients.tolist())),
      "stderr": dict(zip(scaling_fit.COEFFICIENTS, fitted.stderr.tolist())),
      "dof": fitted.dof,
      "residuals": {s["name"]: float(r) for s, r in zip(done, fitted.residuals)},
      "interaction_resolved": fitted.resolved("c"),
  }


def _fit_text(joint: dict) -> str:
  coefficient = lambda k: f"{k} = {joint['coefficients'][k]:+.4f} ± {joint['stderr'][k]:.4f}"
  lines = [
      "Fit of log L = a log N + b log E + c log N log E + d (N: active non-embedding parameters; "
      f"{joint['dof']} degrees of freedom): "
      + ", ".join(coefficient(k) for k in scaling_fit.COEFFICIENTS)
      + ".",
      "Residuals in log L: "
      + ", ".join(f"{name} {r:+.4f}" for name, r in joint["residuals"].items())
      + ".",
      "The interaction c is "
      + (
          "resolved (|c| > 2 standard errors)."
          if joint["interaction_resolved"]
          else "not resolved (within 2 standard errors of 0)."
      ),
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m research.report SWEEP_ROOT [--out=DIR] [--heatmap=NAME]")
  root = pathlib.Path(argv[1])
  out = pathlib.Path(_OUT.value) if _OUT.value else root / "report"
  try:
    table = write_report(root, out, _HEATMAP.value)
  except ValueError as error:
    sys.exit(f"research.report: {error}")
  print(table)
  print(f"\nWritten to {out}: report.md, report.json and the plots (*.png).")


if __name__ == "__main__":
  app.run(main)
