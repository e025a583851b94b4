"""`moe.trainer.routing_health`: load CV, max violation, dead experts over a window, and the collapse
warning, on hand-made loads with answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moe.trainer import routing_health as health


def test_cv_and_max_violation_by_hand():
  load = np.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [1.0, 0.0, 0.0, 0.0]])
  # Layer 1: mean 0.25, std sqrt((0.45^2 + 3 * 0.15^2) / 4) = sqrt(0.27 / 4).
  np.testing.assert_allclose(health.load_cv(load), [0.0, np.sqrt(0.27 / 4) / 0.25, np.sqrt(3)])
  np.testing.assert_allclose(health.max_violation(load), [0.0, 0.7 / 0.25 - 1, 3.0])


def test_dead_experts_are_judged_over_the_window():
  # Expert 3 gets 1% of the assignments at every step: under 10% of the mean (2.5%): dead. Expert 2
  # gets nothing at one step only: alive over the window.
  window = np.array([[[0.4, 0.3, 0.29, 0.01]], [[0.4, 0.59, 0.0, 0.01]], [[0.4, 0.3, 0.29, 0.01]]])
  assert health.dead_experts(window).tolist() == [1]


def _collapsed(e=8):
  load = np.full((2, e), 1.0 / e)
  load[1] = 0.0
  load[1, 3] = 0.9
  load[1, 4] = 0.1
  return load


def test_a_collapsed_layer_is_warned_once_after_enough_records():
  tracker = health.RoutingHealth(log_every=20)
  warned = []
  for step in range(20, 20 * (health.COLLAPSE_RECORDS + 3), 20):
    values = tracker.record(step, _collapsed(), sparse_layers=[1, 3])
    warned += tracker.warnings
  assert len(warned) == 1
  assert (
      "sparse layer 3 at step 60" in warned[0] and "90% of its assignments on expert 3" in warned[0]
  )
  assert values["dead_experts"] == [0, 6] and values["max_violation"][0] == pytest.approx(0.0)
  # Recovery resets it; a new collapse is warned again.
  tracker.record(200, np.full((2, 8), 1 / 8), sparse_layers=[1, 3])
  for step in range(220, 220 + 20 * health.COLLAPSE_RECORDS, 20):
    tracker.record(step, _collapsed(), sparse_layers=[1, 3])
  assert len(tracker.warnings) == 1


def test_a_resumed_tracker_continues_the_same_window():
  rng = np.random.default_rng(0)
  loads = [rng.dirichlet(np.full(8, 0.3), size=2) for _ in range(12)]
  whole = health.RoutingHealth(log_every=20)
  values = [whole.record(20 * (i + 1), l) for i, l in enumerate(loads)]
  earlier = [
      {"step": 20 * (i + 1), "split": "train", "expert_load": l.tolist()}
      for i, l in enumerate(loads[:7])
  ]
  resumed = health.RoutingHealth(log_every=20, earlier=earlier)
  again = [resumed.record(20 * (i + 1), l) for i, l in enumerate(loads) if i >= 7]
  assert again == values[7:]
