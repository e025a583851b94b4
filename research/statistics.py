"""A sweep's runs aggregated over seeds: per-config statistics and gaps to the matched baselines.

    runs = load_runs("runs/sweeps/experts")
    configs = summarize(runs)
    print(markdown_table(configs))

Statistics over seeds are mean and sample standard deviation (ddof=1). The gap of a sparse config to a
baseline is mean(sparse) - mean(dense) of the final validation loss (negative: sparse is better), its
standard error sqrt(s_sparse^2 / n_sparse + s_dense^2 / n_dense) (Welch: the seeds of the two configs
are independent draws, no pairing assumed), and sigma = gap / standard error. The router statistics are
means over the training records of the last quarter of the run (train capacity factor), over seeds:
the dropped fraction of each choice rank (mean over sparse layers), the load entropy (entropy of the
fraction of claims per expert over ln E, mean over sparse layers: 1.0 uniform, 0.0 one expert), the
load's coefficient of variation (mean over sparse layers), the max violation (max_e load_e / mean - 1
of the busiest sparse layer, 0 when even) and the dead experts per sparse layer (moe.trainer.routing_health).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import ml_collections
import numpy as np
from scipy import special

from moe.config.config_dict import experiment_from_config_dict
from moe.config.experiment import ExperimentConfig
from moe.models import accounting
from moe.trainer import routing_health
from moe.trainer.workdir import CONFIG, is_complete
from moe.trainer.run_records import METRICS, json_safe, read_json, read_metrics
from research import sweep_plan


@dataclasses.dataclass
class RunResult:
  """One run's config and records (see `load_runs`)."""

  name: str
  seed: int
  workdir: str
  cfg: ExperimentConfig
  match: str | None  # A baseline's measure; None for a config of the sweep itself.
  baseline_of: str | None
  complete: bool  # `moe.trainer.workdir.is_complete`: the final checkpoint and records are on disk.
  eval_steps: list[int]
  eval_losses: list[float]
  eval_tokens: (
      int | None
  )  # Tokens the final evaluation scored (None: recorded before it was logged).
  train: list[dict]  # The train records of metrics.jsonl, in order.

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.train.global_batch_size * self.cfg.train.seq_len

  def time_at(self, step: int) -> float:
    """Train seconds at `step`, from the last train record at or before it (0 before the first)."""
    times = [r["time_s"] for r in self.train if r["step"] <= step and "time_s" in r]
    return times[-1] if times else 0.0


def _load_run(workdir: pathlib.Path, entry: dict) -> RunResult | None:
  if not (workdir / CONFIG).exists():
    return None  # Never started.
  values = read_json(workdir / CONFIG)
  try:
    cfg = experiment_from_config_dict(ml_collections.ConfigDict(values))
  except (ValueError, TypeError, AttributeError) as error:
    raise ValueError(f"{workdir / CONFIG}: not a run's config ({error})") from None
  records = read_metrics(workdir / METRICS)
  # A resumed run may have logged a step twice (before and after the restart): keep the last.
  eval_records = {r["step"]: r for r in records if r.get("split") == "eval"}
  evals = {step: r["loss"] for step, r in eval_records.items()}
  train = list({r["step"]: r for r in records if r.get("split") == "train"}.values())
  steps = sorted(evals)
  return RunResult(
      name=entry.get("name", cfg.name),
      seed=int(entry.get("seed", cfg.train.seed)),
      workdir=str(workdir),
      cfg=cfg,
      match=entry.get("match"),
      baseline_of=entry.get("baseline_of"),
      complete=is_complete(workdir, cfg.train.steps),
      eval_steps=steps,
      eval_losses=[evals[s] for s in steps],
      eval_tokens=eval_records[steps[-1]].get("tokens") if steps else None,
      train=train,
  )


def load_runs(root: str | pathlib.Path) -> list[RunResult]:
  """The runs of a sweep root: those of its manifest (`research.sweep_plan`), else every `*/seed*` workdir."""
  root = pathlib.Path(root)
  entries = sweep_plan.read_manifest(root)
  if not entries:
    entries = [{"workdir": str(p.parent)} for p in sorted(root.glob(f"*/seed*/{CONFIG}"))]
  runs = [_load_run(pathlib.Path(e["workdir"]), e) for e in entries]
  return [r for r in runs if r is not None]


def _mean_std(values: list[float]) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else math.nan)


def _last_quarter_mean(run: RunResult, key: str) -> np.ndarray | None:
  """Mean of a per-layer train statistic over the last quarter of the run's train records."""
  rows = [r[key] for r in run.train if key in r]
  if not rows:
    return None
  return np.mean(np.asarray(rows[len(rows) - max(1, len(rows) // 4) :], np.float64), axis=0)


def _router_stats(runs: list[RunResult]) -> dict:
  dropped = [d for d in (_last_quarter_mean(r, "dropped_fraction") for r in runs) if d is not None]
  loads = [l for l in (_last_quarter_mean(r, "expert_load") for r in runs) if l is not None]
  if not loads:
    return {}
  out = {"dropped_per_rank": np.mean([d.mean(axis=0) for d in dropped], axis=0).tolist()}
  entropy, violation, cv, dead = [], [], [], []
  for load_YE in loads:  # [sparse layers, E] fractions of claims per expert.
    p = load_YE / load_YE.sum(axis=-1, keepdims=True)
    h = np.sum(special.entr(p), axis=-1)
    entropy.append(float(np.mean(h / math.log(p.shape[-1]))) if p.shape[-1] > 1 else 1.0)
    violation.append(float(np.max(routing_health.max_violation(p))))
    cv.append(float(np.mean(routing_health.load_cv(p))))
    dead.append(float(np.mean(routing_health.dead_experts(p[None]))))
  out["load_entropy"] = float(np.mean(entropy))  # 1.0: uniform; 0.0: one expert takes everything.
  # The busiest expert of any sparse layer: max load / mean load - 1 (0: even), mean over seeds.
  out["max_violation"] = float(np.mean(violation))
  out["load_cv"] = float(np.mean(cv))  # Mean over sparse layers and seeds.
  out["dead_experts"] = float(np.mean(dead))  # Per sparse layer, over the last quarter.
  return out


def summarize(runs: list[RunResult]) -> list[dict]:
  """One dict per config name (complete runs only), in the order the runs came."""
  names = list(dict.fromkeys(r.name for r in runs))
  summaries = []
  for name in names:
    group = [r for r in runs if r.name == name and r.complete and r.eval_losses]
    pending = [r.seed for r in runs if r.name == name and not r.complete]
    # Complete without a loss to aggregate: trained with train.eval_batches=0.
    unevaluated = [r.seed for r in runs if r.name == name and r.complete and not r.eval_losses]
    if not group:
      summaries.append(
          {"name": name, "seeds": [], "pending_seeds": pending, "unevaluated_seeds": unevaluated}
      )
      continue
    cfg = group[0].cfg
    counts = accounting.param_counts(cfg.model)
    final = [r.eval_losses[-1] for r in group]
    best = [min(r.eval_losses) for r in group]
    tokens_per_s = [
        r.tokens_per_step * r.cfg.train.steps / r.time_at(r.cfg.train.steps) for r in group
    ]
    s = {
        "name": name,
        "match": group[0].match,
        "baseline_of": group[0].baseline_of,
        "sparse": cfg.model.moe is not None and cfg.model.num_sparse_layers > 0,
        "seeds": [r.seed for r in group],
        "pending_seeds": pending,
        "steps": cfg.train.steps,
        "tokens_per_step": group[0].tokens_per_step,
        "total_params": counts.total,
        "active_params": counts.active,
        "active_non_embedding_params": counts.non_embedding_active,
        "experts": cfg.model.moe.num_experts if cfg.model.num_sparse_layers else 1,
        "data": cfg.data.source.value,
        "train_flops_per_token": accounting.flops_per_token(cfg.model, cfg.train.seq_len).total,
        "eval_tokens": group[0].eval_tokens,
        "final_loss": final,
        "best_loss": best,
        "tokens_per_s": _mean_std(tokens_per_s)[0],
        **_router_stats(group),
    }
    s["final_mean"], s["final_std"] = _mean_std(final)
    s["best_mean"], s["best_std"] = _mean_std(best)
    summaries.append(s)
  _add_gaps(summaries)
  return summaries


def gap(sparse: list[float], dense: list[float]) -> dict:
  """mean(sparse) - mean(dense), its Welch standard error and the gap in standard errors."""
  ms, ss = _mean_std(sparse)
  md, sd = _mean_std(dense)
  se = (
      math.sqrt(ss**2 / len(sparse) + sd**2 / len(dense))
      if min(len(sparse), len(dense)) > 1
      else math.nan
  )
  diff = ms - md
  return {"gap": diff, "se": se, "sigma": diff / se if se and se > 0 else math.nan}


def _add_gaps(summaries: list[dict]) -> None:
  by_name = {s["name"]: s for s in summaries}
  for s in summaries:
    if s.get("match") is None or not s["seeds"]:
      continue
    sparse = by_name.get(s["baseline_of"])
    if sparse and sparse["seeds"]:
      sparse.setdefault("gaps", {})[s["match"]] = {
          "baseline": s["name"],
          **gap(sparse["final_loss"], s["final_loss"]),
      }


def json_ready(value):
  """`value` as strict JSON, non-finite floats as "NaN", "Infinity", "-Infinity" (a standard deviation
  of one seed is NaN): the convention of metrics.jsonl (`moe.trainer.run_records.json_safe`)."""
  return json_safe(value)


def _mean_and_std_text(mean: float, std: float, digits: int = 4) -> str:
  return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _gap_cell(g: dict | None) -> str:
  if g is None:
    return ""
  se = "" if math.isnan(g["se"]) else f" ± {g['se']:.4f} ({g['sigma']:+.1f}σ)"
  return f"{g['gap']:+.4f}{se}"


def markdown_table(summaries: list[dict]) -> str:
  """The sweep as a Markdown table: one row per config (losses in nats per token)."""
  matches = sorted({m for s in summaries for m in s.get("gaps", {})})
  header = ["config", "seeds", "params total / active", "train GFLOPs/token", "eval tokens"]
  header += ["final val loss"]
  header += ["best val loss"] + [f"gap vs dense {m}" for m in matches]
  header += ["tokens/s", "dropped per rank", "load entropy", "load CV", "max violation"]
  header += ["dead experts"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for s in summaries:
    if not s["seeds"]:
      why = f"pending: {s['pending_seeds']}"
      if s.get("unevaluated_seeds"):
        why += f"; not evaluated (train.eval_batches=0): {s['unevaluated_seeds']}"
      lines.append(f"| {s['name']} | 0 ({why}) |" + " |" * (len(header) - 2))
      continue
    dropped = s.get("dropped_per_rank")
    cells = [
        s["name"],
        str(len(s["seeds"])),
        f"{s['total_params'] / 1e6:.2f}M / {s['active_params'] / 1e6:.2f}M",
        f"{s['train_flops_per_token'] / 1e9:.4f}",
        "" if s.get("eval_tokens") is None else f"{s['eval_tokens']:,}",
        _mean_and_std_text(s["final_mean"], s["final_std"]),
        _mean_and_std_text(s["best_mean"], s["best_std"]),
        *(_gap_cell(s.get("gaps", {}).get(m)) for m in matches),
        f"{s['tokens_per_s']:,.0f}",
        "" if dropped is None else " / ".join(f"{d:.3f}" for d in dropped),
        "" if "load_entropy" not in s else f"{s['load_entropy']:.3f}",
        "" if "load_cv" not in s else f"{s['load_cv']:.2f}",
        "" if "max_violation" not in s else f"{s['max_violation']:.2f}",
        "" if "dead_experts" not in s else f"{s['dead_experts']:.1f}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
