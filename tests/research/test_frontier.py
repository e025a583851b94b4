"""The dense frontier and the compute multiplier (`research.frontier`) on curves with known answers.

Dense curves are drawn from laws whose inverse is known in closed form: loss linear in log-FLOPs
(where piecewise-linear interpolation in log-FLOPs is exact) and a power law L = a C^-b + c (where
the fitted law must give back the compute for a loss beyond the frontier).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

import configs.scaling
from moe.config.config_dict import experiment_from_config_dict, to_json
from moe.models import accounting
from moe.trainer.run_records import metrics_line
from research import frontier, statistics

LINEAR = lambda c: 9.0 - 0.25 * math.log(c)  # Loss linear in log-compute.


def _curve(law, lo, hi, n=12, name="dense"):
  flops = np.geomspace(lo, hi, n)
  return frontier.Curve(name, flops, np.array([law(c) for c in flops]))


def test_reading_off_an_envelope_of_two_runs_is_exact_where_loss_is_linear_in_log_flops():
  better = _curve(LINEAR, 1e6, 1e9, name="better")
  worse = _curve(lambda c: LINEAR(c) + 0.1, 1e5, 1e10, name="worse")
  front = frontier.Frontier.of([better, worse])
  target = LINEAR(3.7e7)
  flops, how = front.compute_to_reach(target)
  assert how == frontier.INTERPOLATED and flops == pytest.approx(3.7e7, rel=1e-9)
  # Beyond the better run's last point the worse one is the envelope: it reaches L at 10^0.4 x.
  flops, how = front.compute_to_reach(LINEAR(5e9) + 0.1)
  assert how == frontier.INTERPOLATED and flops == pytest.approx(5e9, rel=1e-9)


def test_the_envelope_never_rises_with_compute():
  rising = frontier.Curve(
      "diverged", np.geomspace(1e6, 1e8, 5), np.array([3.0, 2.5, 2.0, 2.2, 2.4])
  )
  front = frontier.Frontier.of([rising])
  assert np.all(np.diff(front.loss) <= 0) and front.loss[-1] == 2.0
  flops, _ = front.compute_to_reach(2.0)
  assert flops == pytest.approx(1e7)  # The first point that reached it, not a later one.


def test_a_loss_beyond_the_frontier_is_read_off_the_fitted_power_law_and_marked():
  law = frontier.PowerLaw(a=40.0, b=0.2, c=1.1)
  dense = _curve(law.loss, 1e7, 1e10, n=20)
  front = frontier.Frontier.of([dense])
  assert front.fit.b == pytest.approx(0.2, rel=1e-3) and front.fit.c == pytest.approx(1.1, abs=1e-3)
  beyond = float(law.loss(1e11))  # Lower than the densest run reached.
  flops, how = front.compute_to_reach(beyond)
  assert how == frontier.EXTRAPOLATED and flops == pytest.approx(1e11, rel=0.02)
  flops, how = front.compute_to_reach(1.05)  # Below the irreducible loss: never.
  assert flops is None and how == frontier.NEVER


def test_the_power_law_fit_recovers_known_coefficients():
  flops = np.geomspace(1e8, 1e12, 15)
  fit = frontier.fit_power_law(flops, 3.0 * flops**-0.15 + 0.8)
  assert (fit.a, fit.b, fit.c) == pytest.approx((3.0, 0.15, 0.8), rel=1e-4)


def _write(root: pathlib.Path, arg: str, seed: int, loss_at_flops, steps=(100, 200, 400, 800)):
  """A complete run of configs/scaling.py:<arg> whose eval losses follow `loss_at_flops`."""
  cd = configs.scaling.get_config(arg)
  cd.train.seed, cd.train.steps = seed, steps[-1]
  cfg = experiment_from_config_dict(cd)
  workdir = root / cd.name / f"seed{seed}"
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(to_json(cfg)))
  per_step = (
      accounting.flops_per_token(cfg.model, cfg.train.seq_len).total
      * cfg.train.global_batch_size
      * cfg.train.seq_len
  )
  records = [{"step": s, "split": "train", "loss": 3.0, "time_s": float(s)} for s in steps]
  records += [
      {"step": s, "split": "eval", "loss": loss_at_flops(s * per_step, seed)} for s in steps
  ]
  (workdir / "metrics.jsonl").write_text("".join(metrics_line(r) for r in records))
  (workdir / "checkpoints" / str(steps[-1])).mkdir(parents=True)  # Committed, as orbax lists it.
  return per_step


def test_multipliers_of_sparse_runs_read_off_the_dense_runs(tmp_path):
  dense = lambda c, seed: LINEAR(c)
  for d in (32, 64):
    for seed in (0, 1):
      _write(tmp_path, f"d={d},experts=0,size=tiny", seed, dense)
  # A sparse model whose final loss is what the frontier reaches with 2.5x (seed 0) and 3.5x
  # (seed 1) its final compute (within the d=64 dense run's reach, 2.9x): EL from the
  # seed-mean loss, linear in log-compute, is the geometric mean of the two.
  spent = {}

  def sparse(c, seed):
    spent[seed] = max(spent.get(seed, 0.0), c)
    return LINEAR(c * (2.5 if seed == 0 else 2.0))

  per_step = None
  for seed in (0, 1):
    per_step = _write(tmp_path, "d=32,experts=16,size=tiny", seed, sparse)
  result = frontier.multipliers(statistics.load_runs(tmp_path))
  (row,) = result["configs"]
  assert row["name"] == "scaling_d32_e16_tiny" and row["train_flops"] == pytest.approx(
      800 * per_step
  )
  assert row["el_per_seed"] == pytest.approx([2.5, 2.0], rel=1e-6)
  assert row["el"] == pytest.approx(math.sqrt(2.5 * 2.0), rel=1e-6)
  assert row["el_read"] == frontier.INTERPOLATED
  lo, hi = row["el_interval"]  # Resampling 2 seeds: between the two seeds' values.
  assert 2.0 - 1e-6 <= lo <= row["el"] <= hi <= 2.5 + 1e-6
  # The dense model of its width ends at LINEAR(800 steps of its compute); the sparse curve, at
  # k x its own compute, reaches that loss at step 800 * (dense per-step FLOPs / (k * sparse's)).
  dense_d32 = configs.scaling.get_config("d=32,experts=0,size=tiny")
  dense_cfg = experiment_from_config_dict(dense_d32)
  dense_step = accounting.flops_per_token(dense_cfg.model, 128).total * 32 * 128
  ((ref, fraction),) = row["steps_to_reach"].items()
  assert ref == "scaling_d32_dense_tiny"
  # Seed-mean of LINEAR(k s p) is LINEAR(s p sqrt(2.5 * 3.5)): reached at s = 800 q / (sqrt(...) p).
  expected = 800 * dense_step / (math.sqrt(2.5 * 2.0) * per_step) / 800
  assert fraction == pytest.approx(expected, rel=1e-6)


def test_markdown_table_says_extrapolated_and_never():
  rows = {
      "configs": [
          {
              "name": "s",
              "seeds": [0],
              "experts": 16,
              "d_model": 64,
              "final_loss": 1.2,
              "train_flops": 1e15,
              "el": 1.8,
              "el_read": frontier.EXTRAPOLATED,
              "el_per_seed": [1.8],
              "steps_to_reach": {"dense": None},
          },
          {
              "name": "t",
              "seeds": [0],
              "experts": 4,
              "d_model": 64,
              "final_loss": 0.9,
              "train_flops": 1e15,
              "el": None,
              "el_read": frontier.NEVER,
              "el_per_seed": [None],
              "steps_to_reach": {},
          },
      ]
  }
  table = frontier.markdown_table(rows)
  assert "1.80 (extrapolated)" in table and "dense: not reached" in table
  assert "never reached" in table


def test_a_one_seed_sparse_model_gets_no_interval_from_the_dense_seeds_alone(tmp_path):
  """Two dense seeds that differ, one sparse seed: resampling would vary only the frontier."""
  for d in (32, 64):
    for seed in (0, 1):
      _write(tmp_path, f"d={d},experts=0,size=tiny", seed, lambda c, s: LINEAR(c) + 0.05 * s)
  _write(tmp_path, "d=32,experts=16,size=tiny", 0, lambda c, s: LINEAR(2.0 * c))
  (row,) = frontier.multipliers(statistics.load_runs(tmp_path))["configs"]
  assert len(row["el_per_seed"]) == 1 and row["el"] is not None
  assert "el_interval" not in row
