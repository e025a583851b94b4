"""Sweep reports (`research.report`): statistics over seeds, gaps with standard errors, router statistics.

Workdirs are written here by hand (a real config.json and metrics records with chosen numbers), so
every expected value is computed from those numbers with the textbook formulas.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
from scipy import stats

import configs.switch
from moe.config.config_dict import experiment_from_config_dict, to_json
from moe.trainer.run_records import metrics_line
from research import baselines, statistics, sweep_plan


def _write_run(root: pathlib.Path, cd, seed: int, evals: list[float], loads=None, steps: int = 20):
  workdir = root / cd.name / f"seed{seed}"
  workdir.mkdir(parents=True)
  cd = cd.copy_and_resolve_references()
  cd.train.seed, cd.train.steps = seed, steps
  (workdir / "config.json").write_text(json.dumps(to_json(experiment_from_config_dict(cd))))
  lines = []
  for i, step in enumerate(range(5, steps + 1, 5)):
    record = {"step": step, "split": "train", "loss": 3.0, "time_s": 2.0 * step}
    if loads is not None:
      record["expert_load"] = loads[i]
      record["dropped_fraction"] = [[0.1 * i]]
    lines.append(metrics_line(record))
  n = len(evals)
  for j, loss in enumerate(evals):
    lines.append(metrics_line({"step": steps * (j + 1) // n, "split": "eval", "loss": loss}))
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  (workdir / "checkpoints" / str(steps)).mkdir(parents=True)  # Listed as committed, as orbax lists.
  return workdir


def test_gap_is_welch_difference_of_means():
  sparse, dense = [1.0, 1.2, 1.1], [1.3, 1.5]
  g = statistics.gap(sparse, dense)
  # scipy's Welch t-test: its statistic is the difference of the means over the same standard error.
  welch = stats.ttest_ind(sparse, dense, equal_var=False)
  assert g["gap"] == pytest.approx(1.1 - 1.4)
  assert g["sigma"] == pytest.approx(welch.statistic)
  assert g["se"] == pytest.approx((1.1 - 1.4) / welch.statistic)
  assert math.isnan(statistics.gap([1.0], [2.0])["se"])  # One seed: no uncertainty, said as such.


def test_summary_over_seeds_with_baseline_and_router_statistics(tmp_path):
  sparse_cd = configs.switch.get_config("size=smoke,experts=4")
  dense_cd = baselines.matched_dense(sparse_cd, on="active_flops")
  # Two sparse layers' loads at four train records; the last quarter is the last record only.
  loads = [[[0.25] * 4, [0.25] * 4]] * 3 + [[[0.5, 0.5, 0.0, 0.0], [0.25] * 4]]
  for seed, evals in ((0, [2.0, 1.50]), (1, [1.9, 1.60]), (2, [1.8, 1.55])):
    _write_run(tmp_path, sparse_cd, seed, evals, loads)
  for seed, evals in ((0, [2.1, 1.70]), (1, [2.0, 1.64])):
    _write_run(tmp_path, dense_cd, seed, evals)
  pending = sparse_cd.copy_and_resolve_references()
  pending.name = "unfinished"
  workdir = _write_run(tmp_path, pending, 0, [2.5, 2.4])
  cfg = json.loads((workdir / "config.json").read_text())
  cfg["train"]["steps"] = 40  # Its final evaluation (step 40) is not there yet.
  (workdir / "config.json").write_text(json.dumps(cfg))

  by_name = {s["name"]: s for s in statistics.summarize(statistics.load_runs(tmp_path))}
  s = by_name[sparse_cd.name]
  assert s["seeds"] == [0, 1, 2] and s["final_loss"] == [1.5, 1.6, 1.55]
  assert s["final_mean"] == pytest.approx(1.55) and s["final_std"] == pytest.approx(0.05)
  assert s["best_loss"] == [1.5, 1.6, 1.55]
  assert s["tokens_per_s"] == pytest.approx(s["tokens_per_step"] * 20 / 40.0)
  # Layer 0 half on two experts: entropy ln 2 / ln 4 = 0.5 (layer 1: 1.0), its busiest expert at
  # 0.5 * 4 = 2x the mean load (violation 1.0, the busiest of any layer); its load [1/2, 1/2, 0, 0]
  # has std 1/4 over mean 1/4 (CV 1.0; layer 1: 0) and two experts without any claim (layer 1: none).
  assert s["load_entropy"] == pytest.approx((0.5 + 1.0) / 2)
  assert s["max_violation"] == pytest.approx(1.0)
  assert s["load_cv"] == pytest.approx((1.0 + 0.0) / 2)
  assert s["dead_experts"] == pytest.approx((2 + 0) / 2)
  assert s["dropped_per_rank"] == pytest.approx([0.3])
  # No manifest: the baseline is not known as one, so no gap; with the sweep's manifest it is.
  assert "gaps" not in s
  runs = [
      sweep_plan.Run(n, seed, "spec", (), m, b, str(tmp_path / n / f"seed{seed}"), 20)
      for n, m, b, seeds in (
          (sparse_cd.name, None, None, (0, 1, 2)),
          (dense_cd.name, "active_flops", sparse_cd.name, (0, 1)),
          ("unfinished", None, None, (0,)),
      )
      for seed in seeds
  ]
  sweep_plan.write_manifest(tmp_path, runs)
  by_name = {s["name"]: s for s in statistics.summarize(statistics.load_runs(tmp_path))}
  g = by_name[sparse_cd.name]["gaps"]["active_flops"]
  assert g["baseline"] == dense_cd.name
  assert g["gap"] == pytest.approx(1.55 - 1.67)
  welch = stats.ttest_ind([1.5, 1.6, 1.55], [1.70, 1.64], equal_var=False)
  assert g["sigma"] == pytest.approx(welch.statistic)
  assert by_name["unfinished"]["seeds"] == [] and by_name["unfinished"]["pending_seeds"] == [0]
  table = statistics.markdown_table(list(by_name.values()))
  assert f"| {sparse_cd.name} | 3 |" in table and "1.5500 ± 0.0500" in table
  assert "| unfinished | 0 (pending: [0]) |" in table


def test_a_run_stopped_in_start_up_is_pending_and_broken_files_are_named(tmp_path):
  """config.json and nothing else (a kill during start-up): pending, no plot of it, no error. A
  config.json or sweep.json that is not JSON: one error naming the file."""
  from research import report  # pylint: disable=g-import-not-at-top

  cd = configs.switch.get_config("size=smoke")
  workdir = tmp_path / cd.name / "seed0"
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(to_json(experiment_from_config_dict(cd))))
  table = report.write_report(tmp_path, tmp_path / "out")
  assert f"| {cd.name} | 0 (pending: [0]) |" in table
  assert not (tmp_path / "out" / "expert_load.png").exists()

  (workdir / "config.json").write_text('{"train": ')
  with pytest.raises(ValueError, match=rf"^{workdir / 'config.json'}: not valid JSON \("):
    report.write_report(tmp_path, tmp_path / "out")
  (tmp_path / sweep_plan.MANIFEST).write_text("[{")
  with pytest.raises(ValueError, match=rf"^{tmp_path / sweep_plan.MANIFEST}: not valid JSON \("):
    report.write_report(tmp_path, tmp_path / "out")
