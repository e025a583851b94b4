"""Routing health per sparse layer, from the expert load of the logged train steps, and a warning
when a layer collapses.

    health = RoutingHealth(cfg.train.log_every, earlier_records)
    values.update(health.record(step, load_YE))      # load_cv, max_violation, dead_experts
    for line in health.warnings: print(line)

For each sparse layer, from the fraction of its assignments per expert (`load_YE`, [layers, E]):
* `load_cv`: the coefficient of variation of the load, std / mean over experts (0: even).
* `max_violation`: max_e load_e / mean - 1 (DeepSeek's MaxVio; 0: even; E - 1: one expert has all).
* `dead_experts`: experts whose mean load over the logged steps of the last `WINDOW_STEPS` steps is
  under `DEAD_FRACTION` of the mean load (the window is what the records sample: one step in
  `log_every`).
A layer has collapsed when most of its assignments go to one expert (`COLLAPSED_SHARE`) or more
than half its experts are dead, in `COLLAPSE_RECORDS` consecutive records; the warning is said
once per layer until it recovers.
"""

from __future__ import annotations

import collections
import math

import numpy as np

DEAD_FRACTION = 0.1
WINDOW_STEPS = 100
COLLAPSED_SHARE = 0.5
COLLAPSE_RECORDS = 3
LOAD = "expert_load"


def load_cv(load_YE: np.ndarray) -> np.ndarray:
  load_YE = np.asarray(load_YE, np.float64)
  return load_YE.std(axis=-1) / np.maximum(load_YE.mean(axis=-1), 1e-30)


def max_violation(load_YE: np.ndarray) -> np.ndarray:
  load_YE = np.asarray(load_YE, np.float64)
  return load_YE.max(axis=-1) / np.maximum(load_YE.mean(axis=-1), 1e-30) - 1.0


def dead_experts(window_WYE: np.ndarray) -> np.ndarray:
  """Per layer, experts whose mean load over the window is under DEAD_FRACTION of the mean."""
  mean_YE = np.asarray(window_WYE, np.float64).mean(axis=0)
  threshold_N1 = DEAD_FRACTION * mean_YE.mean(axis=-1, keepdims=True)
  return np.sum(mean_YE < threshold_N1, axis=-1)


class RoutingHealth:
  """The window of logged loads and the collapse counters of a run.

  Args:
    log_every: steps between train records (the window holds WINDOW_STEPS / log_every of them).
    earlier: the run's train records so far (a resumed run continues the same window).
  """

  def __init__(self, log_every: int, earlier: list[dict] = ()):
    self._window = collections.deque(maxlen=max(1, math.ceil(WINDOW_STEPS / log_every)))
    self._streak: np.ndarray | None = None
    self._warned: np.ndarray | None = None
    self.warnings: list[str] = []
    for record in earlier:
      if LOAD in record:
        self._update(np.asarray(record[LOAD], np.float64))

  def _update(self, load_YE: np.ndarray) -> np.ndarray:
    self._window.append(load_YE)
    dead_N = dead_experts(np.stack(self._window))
    share_N = load_YE.max(axis=-1) / np.maximum(load_YE.sum(axis=-1), 1e-30)
    collapsed = (share_N > COLLAPSED_SHARE) | (dead_N > load_YE.shape[-1] / 2)
    if self._streak is None:
      self._streak = np.zeros(len(load_YE), int)
      self._warned = np.zeros(len(load_YE), bool)
    self._streak = np.where(collapsed, self._streak + 1, 0)
    self._warned &= collapsed
    return dead_N

  def record(self, step: int, load_YE, sparse_layers: list[int] | None = None) -> dict:
    """The health values of one train record; sets `warnings` to the lines to print."""
    load_YE = np.asarray(load_YE, np.float64)
    dead_N = self._update(load_YE)
    self.warnings = []
    layers = sparse_layers or list(range(len(load_YE)))
    for i in np.flatnonzero((self._streak >= COLLAPSE_RECORDS) & ~self._warned):
      self._warned[i] = True
      share = load_YE[i].max() / max(load_YE[i].sum(), 1e-30)
      self.warnings.append(
          f"warning: routing collapsed in sparse layer {layers[i]} at step {step}: "
          f"{share:.0%} of its assignments on expert {int(load_YE[i].argmax())}, "
          f"{int(dead_N[i])} of {load_YE.shape[-1]} experts dead (under {DEAD_FRACTION:.0%} of "
          f"the mean load over {WINDOW_STEPS} steps), for {COLLAPSE_RECORDS} records in a row"
      )
    return {
        "load_cv": load_cv(load_YE).tolist(),
        "max_violation": max_violation(load_YE).tolist(),
        "dead_experts": dead_N.astype(int).tolist(),
    }
