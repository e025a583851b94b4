"""The main job's verdict (`experiments.compare`): the gap this run measured, the committed figures
it is read against (docs/results/main/report.json: the main regime's seeds), and whether the gap is
resolved, beyond 3 standard errors of the seed noise: by this run's own seeds, or by the committed
seeds when those resolve it and this run's gap lies within 2 of its standard errors of theirs (one
seed of a 10-minute pair cannot resolve a gap of 0.02 whose single-draw noise is 0.007).
"""

from __future__ import annotations

import math
import pathlib

from moe.trainer import run_records

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "results" / "main" / "report.json"


def _shown(path: pathlib.Path) -> str:
  """The path relative to the repository where it lies inside it."""
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def committed(sparse: str, dense: str, path: pathlib.Path = COMMITTED) -> tuple[dict, dict] | None:
  """The committed summaries (seeds, final_std, gaps) of the two configs, or None."""
  if not path.exists():
    return None
  report = run_records.from_json_safe(run_records.read_json(path))
  by_name = {c["name"]: c for c in report["configs"]}
  pair = by_name.get(sparse), by_name.get(dense)
  # No spread: a config missing, or one seed (NaN; null in reports written before NaN was a string).
  if None in pair or any(c.get("final_std") is None or math.isnan(c["final_std"]) for c in pair):
    return None
  return pair


def verdict(sparse: dict, dense: dict, committed_path: pathlib.Path = COMMITTED) -> str:
  """The gap, its uncertainty, where each figure comes from, and one sentence saying what it means."""
  g = sparse["gaps"]["active_flops"]
  seeds = f"{len(sparse['seeds'])} vs {len(dense['seeds'])} seeds"
  lines = [
      f"Measured in this run: gap (sparse - dense) = {g['gap']:+.4f} nats per token ({seeds})."
  ]
  se = g["se"]
  pair = committed(sparse["name"], dense["name"], committed_path)
  if pair is not None:
    c_sparse, c_dense = pair
    c_gap = c_sparse["gaps"]["active_flops"]
    lines.append(
        f"Committed in {_shown(committed_path)}: gap {c_gap['gap']:+.4f} ±"
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
    lines.append(_read_against_committed(g["gap"], se, pair))
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


def _read_against_committed(gap: float, se: float, pair: tuple[dict, dict] | None) -> str:
  """The verdict when this run alone does not resolve its gap: the committed seeds may, and this
  run either agrees with them (within 2 of its own standard errors) or does not."""
  c_gap = pair[0]["gaps"]["active_flops"] if pair is not None else None
  c_sigma = c_gap["gap"] / c_gap["se"] if c_gap is not None else math.nan
  if not abs(c_sigma) >= 3:  # Written so that a NaN (no committed spread) resolves nothing.
    return "Not resolved: the gap is within 3 standard errors of seed noise at this budget."
  seeds, away = len(pair[0]["seeds"]), abs(gap - c_gap["gap"]) / se
  if away > 2:
    return (
        f"Not resolved: the committed {seeds}-seed gap is {c_sigma:+.1f}σ, but this run's gap is"
        f" {away:.1f} of its standard errors away from it: it does not reproduce the committed"
        " result."
    )
  side = "lower" if c_gap["gap"] < 0 else "higher"
  return (
      f"Resolved by the committed seeds: over {seeds} seeds the sparse model ends {side} than the"
      f" FLOPs-matched dense model by {abs(c_gap['gap']):.3f} nats per token ({c_sigma:+.1f}σ);"
      f" this run alone is within noise of that ({away:.1f} of its standard errors from it)."
  )
