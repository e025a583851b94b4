"""`moe.trainer.progress`: a non-finite step stops the run before it is saved, or is skipped up to a limit;
the error names the step and the non-finite terms; metrics stay strict JSON."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import configs.switch
from moe.config.config_dict import experiment_from_config_dict
from moe.trainer import loop
from moe.trainer.progress import Diverged, nonfinite_terms
from moe.trainer.run_records import read_metrics


def test_nonfinite_terms_name_the_term_and_the_layer():
  values = dict(
      ce=1.0,
      z_loss=math.inf,
      loss=math.nan,
      grad_norm=2.0,
      router_entropy=[1.0, math.nan, 2.0],
      expert_load=[[0.5, 0.5], [math.nan, 1.0], [1, 0]],
  )
  assert nonfinite_terms(values) == [
      "z_loss",
      "loss",
      "router_entropy [sparse layer 1]",
      "expert_load [sparse layer 1]",
  ]
  assert nonfinite_terms(dict(ce=1.0, grad_norm=0.0, router_entropy=[1.0])) == []


def diverging(tmp_path, **train):
  """The smoke switch model at a learning rate that makes it diverge within a few steps."""
  cd = configs.switch.get_config("size=smoke")
  cd.train.update(
      steps=20,
      learning_rate=1e4,
      checkpoint_every=2,
      keep_checkpoints=20,
      log_every=5,
      eval_every=20,
      **train,
  )
  return experiment_from_config_dict(cd), str(tmp_path)


def strict_json_lines(path):
  def refuse(token):
    raise ValueError(f"non-JSON constant {token}")

  return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def saved_steps_are_finite(workdir) -> list[int]:
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  for step in steps:
    state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), step
  return steps


def test_a_nonfinite_step_stops_the_run_before_it_is_saved(tmp_path):
  cfg, workdir = diverging(tmp_path)
  with pytest.raises(Diverged, match=r"diverged at step \d+: non-finite .*grad_norm") as error:
    loop.train_and_evaluate(cfg, workdir)
  step = error.value.step
  assert 2 <= step < 20
  # Every checkpoint is before the diverged step and finite; none after the last finite step.
  assert saved_steps_are_finite(tmp_path) == list(range(2, step, 2))
  lines = strict_json_lines(tmp_path / "metrics.jsonl")
  assert lines[-1]["step"] == step and "NaN" in lines[-1].values()  # Written though not a log step.
  assert not math.isfinite(read_metrics(tmp_path / "metrics.jsonl")[-1]["grad_norm"])


def test_skipped_steps_leave_the_state_finite_and_stop_after_the_limit(tmp_path):
  cfg, workdir = diverging(tmp_path, on_nonfinite="skip", max_consecutive_skips=3)
  with pytest.raises(Diverged, match=r"after 3 skipped steps in a row") as error:
    loop.train_and_evaluate(cfg, workdir)
  skipped = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("skipped")]
  assert [r["step"] for r in skipped] == [
      error.value.step - 2,
      error.value.step - 1,
      error.value.step,
  ]
  # Skipped steps are saved (their state is the last finite one), the stopping step is not, and every
  # checkpoint is finite.
  assert saved_steps_are_finite(tmp_path) == list(range(2, error.value.step, 2))
  strict_json_lines(tmp_path / "metrics.jsonl")
