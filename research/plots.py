"""The plots of a sweep report (PNG, written atomically): loss curves, expert load, dropped tokens.

Every function takes `research.statistics.RunResult`s and a path. Seeds of one config are drawn as their mean
with a band from the lowest to the highest seed; a config with one seed is a line.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from moe.models import accounting
from research.statistics import RunResult

# x axes of `loss_curves`: label and the x value of each eval point of a run.
LOSS_AXES = {
    "steps": ("training step", lambda run, steps: np.asarray(steps, np.float64)),
    "flops": (
        "cumulative training FLOPs (as computed: router and capacity slack included)",
        lambda run, steps: np.asarray(steps, np.float64)
        * run.tokens_per_step
        * accounting.flops_per_token(run.cfg.model, run.cfg.train.seq_len).total,
    ),
    "wall": (
        "training wall-clock time (s, this machine)",
        lambda run, steps: np.asarray([run.time_at(s) for s in steps], np.float64),
    ),
}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  return pyplot


def _save(fig, path: pathlib.Path) -> None:
  plt = _pyplot()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  tmp.replace(path)


# Line style of a matched dense baseline (research.baselines); its sparse config is solid, in the same colour.
_BASELINE_STYLES = {"active_flops": "--", "active_params": ":", "total_params": "-."}
# More configs than this: a wider figure, the legend beside the axes (inside, it hides the curves).
_LEGEND_INSIDE_MAX = 8


def _by_name(runs: list[RunResult]) -> dict[str, list[RunResult]]:
  groups: dict[str, list[RunResult]] = {}
  for run in runs:
    if run.eval_steps:
      groups.setdefault(run.name, []).append(run)
  return groups


def loss_curves(runs: list[RunResult], axis: str, path: pathlib.Path, title: str = "") -> None:
  """Validation loss against steps, cumulative training FLOPs or wall-clock: a line per config."""
  plt = _pyplot()
  label, x_of = LOSS_AXES[axis]
  groups = _by_name(runs)
  fig, ax = plt.subplots(figsize=(8 if len(groups) <= _LEGEND_INSIDE_MAX else 12, 5))
  # A config and its matched baselines share a colour; the line style says which baseline it is.
  families = list(dict.fromkeys(g[0].baseline_of or name for name, g in groups.items()))
  colours = plt.get_cmap("tab10" if len(families) <= 10 else "tab20").colors
  for name, group in groups.items():
    steps = sorted(set.intersection(*(set(r.eval_steps) for r in group)))
    losses = np.asarray([[dict(zip(r.eval_steps, r.eval_losses))[s] for s in steps] for r in group])
    x = np.mean([x_of(r, steps) for r in group], axis=0)
    dense = group[0].cfg.model.moe is None or not group[0].cfg.model.num_sparse_layers
    (line,) = ax.plot(
        x,
        losses.mean(axis=0),
        _BASELINE_STYLES.get(group[0].match, "--" if dense else "-"),
        color=colours[families.index(group[0].baseline_of or name) % len(colours)],
        marker="o",
        markersize=3,
        label=f"{name} ({len(group)} seed{'s' * (len(group) > 1)})",
    )
    if len(group) > 1:
      ax.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
  ax.set_xlabel(label)
  if axis == "flops":
    ax.set_xscale("log")
    ax.tick_params(axis="x", which="minor", labelsize=7)  # 2x10^12 ... labels otherwise collide.
  ax.set_ylabel("validation loss (nats per token; per byte for byte-level data)")
  ax.set_title(title or f"Validation loss against {label.split(' (')[0]}; band: min-max over seeds")
  # The first evaluations are far above the rest: show the part where configs differ.
  finals = [l for g in _by_name(runs).values() for r in g for l in r.eval_losses[-2:]]
  if finals:
    ax.set_ylim(min(finals) - 0.05, max(finals) + 0.25)
  ax.grid(alpha=0.3)
  if not groups:
    pass  # No run has evaluated yet: an empty plot, no legend.
  elif len(groups) <= _LEGEND_INSIDE_MAX:
    ax.legend(fontsize=7)
  else:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  _save(fig, path)


def load_heatmap(run: RunResult, path: pathlib.Path) -> None:
  """Fraction of claims per expert over training steps, one panel per sparse layer (uniform = 1/E)."""
  plt = _pyplot()
  records = [r for r in run.train if "expert_load" in r]
  if not records:
    return  # A run that has logged nothing yet (stopped during start-up).
  load_TNE = np.asarray([r["expert_load"] for r in records], np.float64)
  steps = [r["step"] for r in records]
  n, e = load_TNE.shape[1], load_TNE.shape[2]
  fig, axes = plt.subplots(1, n, figsize=(4 * n + 1, 3.8), squeeze=False, layout="constrained")
  for layer, ax in enumerate(axes[0]):
    image = ax.imshow(
        load_TNE[:, layer, :].T,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        vmin=0.0,
        vmax=max(2.0 / e, float(load_TNE.max())),
        extent=(steps[0], steps[-1], -0.5, e - 0.5),
        interpolation="nearest",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("expert")
    ax.set_title(f"sparse layer {layer}")
  fig.colorbar(image, ax=axes[0].tolist(), label=f"fraction of claims (uniform: {1 / e:.3f})")
  fig.suptitle(f"Expert load, {run.name} seed {run.seed}", fontsize=10)
  _save(fig, path)


def dropped_per_layer(runs: list[RunResult], path: pathlib.Path) -> None:
  """Fraction of claims dropped (all ranks) per sparse layer over steps: a panel per sparse config."""
  plt = _pyplot()
  groups = {
      name: g
      for name, g in _by_name(runs).items()
      if any("dropped_fraction" in r for r in g[0].train)
  }
  if not groups:
    return
  cols = min(3, len(groups))
  rows = math.ceil(len(groups) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax, (name, group) in zip(axes.flat, groups.items()):
    run = group[0]  # The lowest seed.
    records = [r for r in run.train if "dropped_fraction" in r]
    dropped_TN = np.asarray([r["dropped_fraction"] for r in records], np.float64).mean(axis=-1)
    for layer in range(dropped_TN.shape[1]):
      ax.plot([r["step"] for r in records], dropped_TN[:, layer], label=f"sparse layer {layer}")
    ax.set_title(f"{name} seed {run.seed}", fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel("dropped fraction of claims")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(groups) :]:
    ax.set_visible(False)
  fig.tight_layout()
  _save(fig, path)


def frontier(runs: list[RunResult], leverage: dict, path: pathlib.Path) -> None:
  """Validation loss against training FLOPs: every config's seed-mean curve, the dense frontier
  (black) and its fitted power law (dotted), and each sparse config's final point."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(9, 5.5))
  _, x_of = LOSS_AXES["flops"]
  for name, group in _by_name(runs).items():
    steps = sorted(set.intersection(*(set(r.eval_steps) for r in group)) - {0})
    losses = np.mean([[dict(zip(r.eval_steps, r.eval_losses))[s] for s in steps] for r in group], 0)
    dense = group[0].cfg.model.moe is None or not group[0].cfg.model.num_sparse_layers
    ax.plot(x_of(group[0], steps), losses, "--" if dense else "-", lw=1, alpha=0.8, label=name)
  front = leverage["frontier"]
  ax.plot(front["flops"], front["loss"], "k-", lw=2.5, alpha=0.6, label="dense frontier")
  if front["fit"] is not None:
    c = np.geomspace(front["flops"][0], front["flops"][-1] * 10, 200)
    law = front["fit"]
    ax.plot(c, law["a"] * c ** -law["b"] + law["c"], "k:", lw=1, label="power-law fit")
  for row in leverage["configs"]:
    ax.plot(row["train_flops"], row["final_loss"], "k*", markersize=8)
  ax.set_xscale("log")
  ax.set_xlabel(LOSS_AXES["flops"][0])
  ax.set_ylabel("validation loss")
  finals = [row["final_loss"] for row in leverage["configs"]] + front["loss"][-1:]
  ax.set_ylim(min(finals) - 0.1, max(finals) + 0.6)
  ax.set_title("Loss against training compute; stars: sparse models' final points", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  _save(fig, path)


def multipliers(leverage: dict, path: pathlib.Path) -> None:
  """Compute multiplier EL against active parameters, one line per expert count (bars: the
  16-84% bootstrap interval over seeds; hollow markers: extrapolated)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  by_e: dict[int, list[dict]] = {}
  for row in leverage["configs"]:
    if row["el"] is not None:
      by_e.setdefault(row["experts"], []).append(row)
  for e, rows in sorted(by_e.items()):
    rows = sorted(rows, key=lambda r: r["active_params"])
    x = [r["active_params"] for r in rows]
    (line,) = ax.plot(x, [r["el"] for r in rows], "-", label=f"E = {e}")
    for r in rows:
      filled = r["el_read"] != "extrapolated"
      ax.plot(
          r["active_params"],
          r["el"],
          "o",
          color=line.get_color(),
          markerfacecolor=line.get_color() if filled else "none",
      )
      if "el_interval" in r:
        lo, hi = r["el_interval"]
        ax.vlines(r["active_params"], lo, hi, color=line.get_color(), alpha=0.6)
  ax.axhline(1.0, color="grey", lw=1, ls="--")
  ax.set_xscale("log")
  ax.set_xlabel("active parameters")
  ax.set_ylabel("EL = dense FLOPs to reach its loss / its FLOPs")
  ax.set_title("Compute multiplier of sparse over dense", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)
