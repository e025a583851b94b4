"""The compute a dense model needs to reach a sparse model's loss, read off the dense frontier.

    front = Frontier.of(dense_curves)               # every dense run: loss against training FLOPs
    dense_flops, how = front.compute_to_reach(loss)  # how: "interpolated" | "extrapolated" | "never"
    multipliers(runs)                               # per sparse config: EL, its uncertainty, steps

The frontier is the lower envelope of the dense runs' validation curves (loss at each evaluation
against the cumulative training FLOPs spent until then), each run's curve interpolated linearly in
log-FLOPs between its evaluations, then made non-increasing (with more compute a dense model can
always stop early). Intermediate points of a run trained on a longer cosine schedule are not
compute-optimal for their budget (the learning rate has not decayed yet; Hoffmann et al. 2022), so
the envelope is an upper bound on the loss a dense model could reach with that compute, and the
multiplier read off it leans towards sparse where only long dense runs cover a budget.

The efficiency leverage of a sparse model (Ludziejewski et al. 2025, "efficiency leverage";
Clark et al. 2022 read the same off their curves) is EL = C_dense(L_sparse) / C_sparse: the training
FLOPs the frontier needs to reach the sparse model's final loss over the FLOPs the sparse model spent.
Where the loss lies beyond the frontier (lower than any dense run reached, or higher than its first
point), C_dense comes from a power law L(C) = a C^-b + c fitted to the frontier and is marked
extrapolated; below the fitted c it is never reached.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable

import numpy as np
from scipy import optimize

from moe.models import accounting
from research.statistics import RunResult

INTERPOLATED, EXTRAPOLATED, NEVER = "interpolated", "extrapolated", "never"
# The power law is fitted to the frontier's points within this factor of its largest compute: the
# first evaluations (warm-up, the fast initial drop) do not follow it.
FIT_DECADES = 2.0
BOOTSTRAP_SAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class Curve:
  """A validation curve: loss at each evaluation against cumulative training FLOPs (increasing)."""

  name: str
  flops: np.ndarray
  loss: np.ndarray


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(C) = a * C^-b + c."""

  a: float
  b: float
  c: float

  def loss(self, flops: np.ndarray | float) -> np.ndarray | float:
    return self.a * np.power(flops, -self.b) + self.c

  def flops(self, loss: float) -> float | None:
    """The compute at which the law reaches `loss`; None below its irreducible loss c."""
    if loss <= self.c:
      return None
    return float((self.a / (loss - self.c)) ** (1.0 / self.b))


def fit_power_law(flops: np.ndarray, loss: np.ndarray) -> PowerLaw:
  """Least squares of L = a C^-b + c in log-compute (`scipy.optimize.curve_fit`)."""
  ref = float(np.max(flops))
  x = np.log(np.asarray(flops, np.float64) / ref)
  y = np.asarray(loss, np.float64)
  law = lambda x, amp, b, c: amp * np.exp(-b * x) + c
  span = max(float(y.max() - y.min()), 1e-6)
  (amp, b, c), _ = optimize.curve_fit(
      law,
      x,
      y,
      p0=(span, 0.3, float(y.min()) - span),
      bounds=((0.0, 1e-4, -np.inf), (np.inf, 10.0, float(y.min()))),
      maxfev=20_000,
  )
  return PowerLaw(a=float(amp * ref**b), b=float(b), c=float(c))


@dataclasses.dataclass(frozen=True)
class Frontier:
  """The non-increasing lower envelope of dense curves, on the union of their evaluation points."""

  flops: np.ndarray
  loss: np.ndarray

  @functools.cached_property
  def fit(self) -> PowerLaw | None:
    """The power law through the frontier's last `FIT_DECADES` of compute (None: under 4 points)."""
    late = self.flops >= self.flops[-1] / 10**FIT_DECADES
    return fit_power_law(self.flops[late], self.loss[late]) if late.sum() >= 4 else None

  @classmethod
  def of(cls, curves: Iterable[Curve]) -> Frontier:
    curves = [c for c in curves if len(c.flops)]
    if not curves:
      raise ValueError("the dense frontier needs at least one dense run with evaluations")
    grid = np.unique(np.concatenate([c.flops for c in curves]))
    envelope = np.full(grid.shape, np.inf)
    for c in curves:
      inside = (grid >= c.flops[0]) & (grid <= c.flops[-1])
      along = np.interp(np.log(grid[inside]), np.log(c.flops), c.loss)
      envelope[inside] = np.minimum(envelope[inside], along)
    return cls(grid, np.minimum.accumulate(envelope))

  def loss_at(self, flops: float) -> float:
    return float(np.interp(np.log(flops), np.log(self.flops), self.loss))

  def compute_to_reach(self, loss: float) -> tuple[float | None, str]:
    """(the least compute at which the frontier reaches `loss`, how it was read)."""
    if self.loss[-1] <= loss <= self.loss[0]:
      i = int(np.argmax(self.loss <= loss))  # The first point at or below the loss.
      if i == 0:
        return float(self.flops[0]), INTERPOLATED
      lo, hi = self.loss[i - 1], self.loss[i]
      t = (lo - loss) / (lo - hi)
      log_c = (1 - t) * math.log(self.flops[i - 1]) + t * math.log(self.flops[i])
      return math.exp(log_c), INTERPOLATED
    if self.fit is None:
      return None, NEVER
    flops = self.fit.flops(loss)
    return (None, NEVER) if flops is None else (flops, EXTRAPOLATED)


def _train_flops(run: RunResult, steps) -> np.ndarray:
  per_token = accounting.flops_per_token(run.cfg.model, run.cfg.train.seq_len).total
  return np.asarray(steps, np.float64) * run.tokens_per_step * per_token


def _is_dense(run: RunResult) -> bool:
  return run.cfg.model.moe is None or not run.cfg.model.num_sparse_layers


def _mean_losses(runs: list[RunResult]) -> tuple[np.ndarray, np.ndarray]:
  """(steps, loss): the mean over seeds at the evaluations (after step 0) they all have."""
  steps = sorted(set.intersection(*(set(r.eval_steps) for r in runs)) - {0})
  loss = np.mean([[dict(zip(r.eval_steps, r.eval_losses))[s] for s in steps] for r in runs], 0)
  return np.asarray(steps, np.float64), np.asarray(loss, np.float64)


def _mean_curve(name: str, runs: list[RunResult]) -> Curve:
  """A config's curve: its seed-mean loss against cumulative training FLOPs."""
  steps, loss = _mean_losses(runs)
  return Curve(name, _train_flops(runs[0], steps), loss)


def _by_config(runs: list[RunResult]) -> dict[str, list[RunResult]]:
  out: dict[str, list[RunResult]] = {}
  for r in runs:
    if r.complete and r.eval_steps:
      out.setdefault(r.name, []).append(r)
  return out


def _steps_to_reach(runs: list[RunResult], target: float) -> float | None:
  """The first step (interpolated in log-steps) at which the seed-mean curve reaches `target`."""
  steps, loss = _mean_losses(runs)
  below = np.flatnonzero(loss <= target)
  if not len(below):
    return None
  i = int(below[0])
  if i == 0:
    return float(steps[0])
  lo, hi = loss[i - 1], loss[i]
  t = (lo - target) / (lo - hi)
  return float(math.exp((1 - t) * math.log(steps[i - 1]) + t * math.log(steps[i])))


def _references(sparse: list[RunResult], configs: dict[str, list[RunResult]]) -> list[str]:
  """The dense configs a sparse config's steps are counted against: its matched baselines, and
  the dense models of its width and depth."""
  model = sparse[0].cfg.model
  names = []
  for name, group in configs.items():
    g = group[0]
    if not _is_dense(g):
      continue
    baseline = g.baseline_of == sparse[0].name
    same = (g.cfg.model.d_model, g.cfg.model.num_layers) == (model.d_model, model.num_layers)
    if baseline or (same and g.match is None):
      names.append(name)
  return names


def _multiplier(front: Frontier, losses: np.ndarray, flops: float) -> tuple[float | None, str]:
  needed, how = front.compute_to_reach(float(np.mean(losses)))
  return (None, how) if needed is None else (needed / flops, how)


def _bootstrap(configs, dense_names, sparse_name, seed: int = 0) -> np.ndarray:
  """EL over resamples of the seeds of every config (dense and sparse) with replacement."""
  rng = np.random.default_rng(seed)
  sparse = configs[sparse_name]
  flops = float(_train_flops(sparse[0], [sparse[0].cfg.train.steps])[0])
  values = []
  for _ in range(BOOTSTRAP_SAMPLES):
    pick = lambda g: [g[i] for i in rng.integers(0, len(g), len(g))]
    front = Frontier.of(_mean_curve(n, pick(configs[n])) for n in dense_names)
    el, _ = _multiplier(front, np.array([r.eval_losses[-1] for r in pick(sparse)]), flops)
    values.append(np.nan if el is None else el)
  return np.asarray(values)


def multipliers(runs: list[RunResult], bootstrap: bool = True) -> dict:
  """The frontier of every complete dense run and, per sparse config, its compute multiplier.

  Returns:
    {'frontier': {flops, loss, fit}, 'configs': [per sparse config: name, seeds, final loss,
    train FLOPs, EL (from the seed-mean loss), how it was read, per-seed EL, a 16-84% bootstrap
    interval over the seeds of every config (only where the sparse config has several), active
    parameters, experts, and the fraction of its steps it needed to reach each reference dense
    model's final loss]}. Empty without dense runs.
  """
  configs = _by_config(runs)
  dense_names = [n for n, g in configs.items() if _is_dense(g[0])]
  if not dense_names:
    return {}
  front = Frontier.of(_mean_curve(n, configs[n]) for n in dense_names)
  out = []
  for name, group in configs.items():
    if _is_dense(group[0]):
      continue
    cfg = group[0].cfg
    flops = float(_train_flops(group[0], [cfg.train.steps])[0])
    losses = np.array([r.eval_losses[-1] for r in group])
    el, how = _multiplier(front, losses, flops)
    per_seed = [_multiplier(front, np.array([l]), flops)[0] for l in losses]
    row = {
        "name": name,
        "seeds": [r.seed for r in group],
        "final_loss": float(losses.mean()),
        "train_flops": flops,
        "active_params": accounting.param_counts(cfg.model).active,
        "active_non_embedding_params": accounting.param_counts(cfg.model).non_embedding_active,
        "experts": cfg.model.moe.num_experts,
        "d_model": cfg.model.d_model,
        "el": el,
        "el_read": how,
        "el_per_seed": per_seed,
        "steps_to_reach": {},
    }
    # With one seed of the sparse model, resampling only the dense seeds would give an interval
    # without the sparse model's own seed noise (the larger part at d=64): none is given.
    if bootstrap and len(group) > 1:
      samples = _bootstrap(configs, dense_names, name)
      finite = samples[np.isfinite(samples)]
      if len(finite) == len(samples):
        row["el_interval"] = [float(np.percentile(finite, 16)), float(np.percentile(finite, 84))]
    for ref in _references(group, configs):
      target = float(np.mean([r.eval_losses[-1] for r in configs[ref]]))
      step = _steps_to_reach(group, target)
      row["steps_to_reach"][ref] = None if step is None else step / cfg.train.steps
    out.append(row)
  fit = None if front.fit is None else dataclasses.asdict(front.fit)
  return {
      "frontier": {"flops": front.flops.tolist(), "loss": front.loss.tolist(), "fit": fit},
      "configs": out,
  }


def markdown_table(result: dict) -> str:
  """The multipliers as a Markdown table."""
  header = ["sparse config", "seeds", "E", "d", "final val loss", "train FLOPs"]
  header += [
      "EL (dense FLOPs to reach its loss / its FLOPs)",
      "EL per seed",
      "steps to reach dense",
  ]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in result.get("configs", []):
    el = row["el"]
    cell = "never reached" if el is None else f"{el:.2f}"
    if el is not None and "el_interval" in row:
      cell += f" [{row['el_interval'][0]:.2f}, {row['el_interval'][1]:.2f}]"
    if row["el_read"] == EXTRAPOLATED:
      cell += " (extrapolated)"
    seeds = ", ".join("never" if v is None else f"{v:.2f}" for v in row["el_per_seed"])
    reach = "; ".join(
        f"{ref}: {'not reached' if f is None else f'{f:.2f}'}"
        for ref, f in row["steps_to_reach"].items()
    )
    lines.append(
        f"| {row['name']} | {len(row['seeds'])} | {row['experts']} | {row['d_model']} |"
        f" {row['final_loss']:.4f} | {row['train_flops']:.3g} | {cell} | {seeds} | {reach} |"
    )
  return "\n".join(lines)
