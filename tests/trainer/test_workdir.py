"""The workdir: which config changes a resume accepts, the history of changes, relaunches that write
nothing."""

from __future__ import annotations

import json

import pytest

import configs.switch
from moe.config.config_dict import experiment_from_config_dict, to_json
from moe.trainer import run_records, workdir


def smoke_cfg(**train):
  cd = configs.switch.get_config("size=smoke")
  for key, value in train.items():
    cd.train[key] = value
  return experiment_from_config_dict(cd)


def test_config_differences_ignores_the_named_fields():
  old = to_json(smoke_cfg())
  new = json.loads(json.dumps(old))
  new["train"].update(log_every=7, overwrite=True)
  new["name"] = "renamed"
  new["mesh"]["expert"] = 2
  assert workdir.config_differences(old, new, workdir.RESUMABLE_FIELDS) == []
  assert workdir.config_differences(old, new) == [
      "mesh.expert: 1 -> 2",
      "name: 'switch8_smoke' -> 'renamed'",
      "train.log_every: 5 -> 7",
      "train.overwrite: False -> True",
  ]
  new["model"]["moe"]["num_experts"] = 4
  del new["train"]["seed"]
  assert workdir.config_differences(old, new, workdir.RESUMABLE_FIELDS) == [
      "model.moe.num_experts: 8 -> 4",
      "train.seed: 0 -> <absent>",
  ]


def test_relaunch_with_the_same_config_writes_nothing(tmp_path):
  workdir.prepare_workdir(smoke_cfg(), tmp_path)
  config = tmp_path / workdir.CONFIG
  before = config.stat().st_mtime_ns, config.read_text()
  workdir.prepare_workdir(smoke_cfg(), tmp_path)
  assert (config.stat().st_mtime_ns, config.read_text()) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir.CONFIG]


def test_resumable_changes_are_recorded_with_the_previous_config(tmp_path):
  workdir.prepare_workdir(smoke_cfg(), tmp_path)
  workdir.prepare_workdir(smoke_cfg(log_every=2), tmp_path)
  workdir.prepare_workdir(smoke_cfg(log_every=3, eval_every=4), tmp_path)
  history = [json.loads(line) for line in (tmp_path / workdir.HISTORY).read_text().splitlines()]
  assert [h["changes"] for h in history] == [
      ["train.log_every: 5 -> 2"],
      ["train.eval_every: 10 -> 4", "train.log_every: 2 -> 3"],
  ]
  assert [h["previous"]["train"]["log_every"] for h in history] == [5, 2]
  assert json.loads((tmp_path / workdir.CONFIG).read_text())["train"]["log_every"] == 3


def test_steps_change_needs_the_flag(tmp_path):
  workdir.prepare_workdir(smoke_cfg(steps=20), tmp_path)
  with pytest.raises(ValueError, match=r"train.steps: 20 -> 40 \(changes the learning-rate"):
    workdir.prepare_workdir(smoke_cfg(steps=40), tmp_path)
  assert not (tmp_path / workdir.HISTORY).exists()
  workdir.prepare_workdir(smoke_cfg(steps=40, allow_steps_change=True), tmp_path)
  assert json.loads((tmp_path / workdir.CONFIG).read_text())["train"]["steps"] == 40


def test_missing_config_with_outputs_is_refused(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="config.json is missing but the workdir holds checkpoints"):
    workdir.prepare_workdir(smoke_cfg(), tmp_path)
  workdir.prepare_workdir(smoke_cfg(overwrite=True), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_metrics_are_strict_json_and_read_back_as_floats(tmp_path):
  writer = run_records.MetricsWriter(tmp_path, 0, sparse_layers=[1])
  writer.write(
      {
          "step": 1,
          "split": "train",
          "loss": float("nan"),
          "grad_norm": float("inf"),
          "router_entropy": [float("-inf")],
      }
  )
  writer.close()
  line = (tmp_path / run_records.METRICS).read_text()
  assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))["loss"] == "NaN"
  (record,) = run_records.read_metrics(tmp_path / run_records.METRICS)
  assert record["loss"] != record["loss"] and record["grad_norm"] == float("inf")
  assert record["router_entropy"] == [float("-inf")]


def test_relaunching_a_finished_run_rewrites_no_metrics(tmp_path):
  writer = run_records.MetricsWriter(tmp_path, 0, sparse_layers=[])
  writer.write({"step": 1, "split": "train", "loss": 1.0})
  writer.close()
  path = tmp_path / run_records.METRICS
  before = path.stat().st_mtime_ns
  run_records.MetricsWriter(tmp_path, 1, sparse_layers=[]).close()
  assert path.stat().st_mtime_ns == before
  run_records.MetricsWriter(tmp_path, 0, sparse_layers=[]).close()  # Resuming from 0 drops step 1.
  assert path.read_text() == ""


def test_a_run_recorded_before_a_field_existed_resumes_with_its_default(tmp_path):
  workdir.prepare_workdir(smoke_cfg(), tmp_path)
  recorded = json.loads((tmp_path / workdir.CONFIG).read_text())
  del recorded["train"]["on_nonfinite"], recorded["model"]["moe"]["jitter_eps"]
  (tmp_path / workdir.CONFIG).write_text(json.dumps(recorded))
  workdir.prepare_workdir(smoke_cfg(), tmp_path)  # Both at their defaults: accepted.
  (tmp_path / workdir.CONFIG).write_text(json.dumps(recorded))
  with pytest.raises(ValueError, match=r"train.on_nonfinite: <absent> -> 'skip'"):
    workdir.prepare_workdir(smoke_cfg(on_nonfinite="skip"), tmp_path)
