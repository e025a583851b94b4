"""`research.sweep_plan.reuse` (`python -m research.reuse_run`): a complete run stands for a config that differs from its own only in name."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from moe.config.config_dict import experiment_from_config_dict, to_json
from moe.trainer import workdir as workdir_lib
from moe.trainer.run_records import metrics_line
from research import statistics, sweep_plan

TOPK1 = "configs/ablations.py:family=topk,member=1"
CAPACITY_125 = "configs/ablations.py:family=capacity,member=1.25"  # The same model as top-1.
CAPACITY_2 = "configs/ablations.py:family=capacity,member=2.0"


def _complete_run(workdir: pathlib.Path, spec: str, seed: int = 1) -> dict:
  """A run of `spec` whose final checkpoint and records are on disk (as orbax and the loop leave
  them), written by hand."""
  cfg = experiment_from_config_dict(sweep_plan.with_overrides(spec, [f"train.seed={seed}"]))
  config = json.loads(json.dumps(to_json(cfg)))
  workdir.mkdir(parents=True)
  (workdir / workdir_lib.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  steps = cfg.train.steps
  records = [{"step": steps, "split": "train", "loss": 2.0, "time_s": 1.0}]
  records += [{"step": steps, "split": "eval", "loss": 1.75}]
  (workdir / "metrics.jsonl").write_text("".join(metrics_line(r) for r in records))
  (workdir / "checkpoints" / str(steps)).mkdir(parents=True)
  (workdir / workdir_lib.LOCK).write_text("")
  return config


def test_the_copy_is_the_new_configs_complete_run_and_the_source_is_unchanged(tmp_path):
  source, target = tmp_path / "topk-1_tiny" / "seed1", tmp_path / "capacity-1.25_tiny" / "seed1"
  before = _complete_run(source, TOPK1)
  new = sweep_plan.reuse(source, target, CAPACITY_125)
  assert new["name"] == "capacity-1.25_tiny" != before["name"]
  assert {k: v for k, v in new.items() if k != "name"} == {
      k: v for k, v in before.items() if k != "name"
  }
  assert json.loads((target / workdir_lib.CONFIG).read_text()) == new
  assert json.loads((source / workdir_lib.CONFIG).read_text()) == before
  assert (target / "metrics.jsonl").read_bytes() == (source / "metrics.jsonl").read_bytes()
  assert not (target / workdir_lib.LOCK).exists()  # The source's lock is its own.
  assert workdir_lib.is_complete(target, new["train"]["steps"])
  runs = {r.name: r for r in statistics.load_runs(tmp_path)}
  assert set(runs) == {"topk-1_tiny", "capacity-1.25_tiny"}
  copy = runs["capacity-1.25_tiny"]
  assert copy.complete and copy.seed == 1 and copy.eval_losses == [1.75]


def test_another_model_is_refused_naming_the_field(tmp_path):
  source = tmp_path / "topk-1_tiny" / "seed1"
  _complete_run(source, TOPK1)
  with pytest.raises(sweep_plan.ReuseError, match=r"train_capacity_factor: 1\.25 -> 2\.0"):
    sweep_plan.reuse(source, tmp_path / "capacity-2.0_tiny" / "seed1", CAPACITY_2)
  assert not (tmp_path / "capacity-2.0_tiny").exists()


def test_an_override_makes_the_configs_differ(tmp_path):
  source = tmp_path / "topk-1_tiny" / "seed1"
  _complete_run(source, TOPK1)
  with pytest.raises(sweep_plan.ReuseError, match=r"train\.steps: 400 -> 529"):
    sweep_plan.reuse(source, tmp_path / "x" / "seed1", CAPACITY_125, ["train.steps=529"])


def test_an_incomplete_source_and_an_existing_workdir_are_refused(tmp_path):
  source = tmp_path / "topk-1_tiny" / "seed1"
  _complete_run(source, TOPK1)
  taken = tmp_path / "capacity-1.25_tiny" / "seed1"
  taken.mkdir(parents=True)
  with pytest.raises(sweep_plan.ReuseError, match="never overwritten"):
    sweep_plan.reuse(source, taken, CAPACITY_125)
  (source / "checkpoints" / "400").rmdir()
  with pytest.raises(sweep_plan.ReuseError, match="not complete"):
    sweep_plan.reuse(source, tmp_path / "other" / "seed1", CAPACITY_125)


def test_the_command_line_refuses_in_one_line(tmp_path):
  source = tmp_path / "topk-1_tiny" / "seed1"
  _complete_run(source, TOPK1)
  target = tmp_path / "capacity-2.0_tiny" / "seed1"
  args = [f"--source={source}", f"--workdir={target}", f"--config={CAPACITY_2}"]
  result = subprocess.run(
      [sys.executable, "-m", "research.reuse_run", *args], capture_output=True, text=True
  )
  assert result.returncode == 1 and not target.exists()
  assert result.stderr.strip().splitlines() == [
      f"reuse_run: {source} is not a run of {CAPACITY_2}: "
      "model.moe.train_capacity_factor: 1.25 -> 2.0"
  ]
