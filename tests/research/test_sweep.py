"""Sweeps (`research.sweep`, `research.sweep`): the plan, refusals, and a smoke sweep with its report."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from research import sweep_plan

REPO = pathlib.Path(__file__).resolve().parents[2]
FAMILY = "configs/ablations.py:family=topk,size=smoke"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO)  # Config specs are paths relative to the repository root.


def test_a_family_expands_into_members_times_seeds_with_baselines(tmp_path):
  runs = sweep_plan.plan(
      [FAMILY], seeds=(0, 3), root=tmp_path, baselines=("active_flops", "total_params")
  )
  import configs.ablations  # pylint: disable=g-import-not-at-top

  members = configs.ablations.members("topk")
  assert len(runs) == len(members) * 3 * 2
  names = list(dict.fromkeys(r.name for r in runs))
  assert names[:3] == [
      "topk-1_smoke",
      "topk-1_smoke_dense_active_flops",
      "topk-1_smoke_dense_total_params",
  ]
  assert len({r.workdir for r in runs}) == len(runs)
  for run in runs:
    assert run.workdir == str(tmp_path / run.name / f"seed{run.seed}")
    argv = run.argv("python")
    assert f"--config.train.seed={run.seed}" in argv and f"--workdir={run.workdir}" in argv
    assert (f"--match_dense={run.match}" in argv) == (run.match is not None)
    if run.match is not None:
      assert run.baseline_of == run.name.removesuffix(f"_dense_{run.match}")


def test_overrides_reach_every_run_and_bad_ones_are_refused(tmp_path):
  runs = sweep_plan.plan(
      [f"{FAMILY},member=2"], seeds=(0,), root=tmp_path, overrides=("train.steps=7",)
  )
  assert [r.steps for r in runs] == [7]
  assert "--config.train.steps=7" in runs[0].argv()
  # None (dropless) for an optional field, parsed as the launched command parses it.
  (dropless,) = sweep_plan.plan(
      [f"{FAMILY},member=2"],
      seeds=(0,),
      root=tmp_path,
      overrides=("model.moe.train_capacity_factor=None", "model.moe.group_size=None"),
  )
  assert sweep_plan.config_of(dropless).model.moe.train_capacity_factor is None
  assert "--config.model.moe.train_capacity_factor=None" in dropless.argv()
  with pytest.raises(ValueError, match="--set train.stepz: no such config field"):
    sweep_plan.plan([FAMILY], seeds=(0,), root=tmp_path, overrides=("train.stepz=7",))
  with pytest.raises(ValueError, match="train.b1=1.5 must be a number >= 0 and < 1"):
    sweep_plan.plan([FAMILY], seeds=(0,), root=tmp_path, overrides=("train.b1=1.5",))
  with pytest.raises(ValueError, match="two runs are named 'same'"):
    sweep_plan.plan(
        [f"{FAMILY},member=1", f"{FAMILY},member=2"],
        seeds=(0,),
        root=tmp_path,
        overrides=("name=same",),
    )
  with pytest.raises(ValueError, match="two runs of the plan share the workdir .*/seed0"):
    sweep_plan.plan([f"{FAMILY},member=2"], seeds=(0, 0), root=tmp_path)
  with pytest.raises(ValueError, match="--set model.moe.train_capacity_factor=abc: could not"):
    sweep_plan.plan(
        [FAMILY], seeds=(0,), root=tmp_path, overrides=("model.moe.train_capacity_factor=abc",)
    )
  with pytest.raises(ValueError, match="is a dense config; baselines are matched to sparse models"):
    sweep_plan.plan(
        ["configs/dense.py:size=smoke"], seeds=(0,), root=tmp_path, baselines=("active_flops",)
    )


def _cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
  )


def test_dry_run_prints_one_command_per_run_and_writes_nothing(tmp_path):
  result = _cli(
      "research.sweep",
      f"--config={FAMILY}",
      "--seeds=0,1",
      "--baselines=active_flops",
      f"--root={tmp_path / 'sweep'}",
      "--dry_run",
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3 * 2 * 2
  assert all(
      l.startswith("python -m experiments.train --config=configs/ablations.py:") for l in lines
  )
  assert not (tmp_path / "sweep").exists()
  both = _cli(
      "research.sweep",
      f"--config={FAMILY}",
      "--seeds=0",
      "--baselines=active_flops,total_params",
      f"--root={tmp_path / 'sweep'}",
      "--dry_run",
  )
  assert both.returncode == 0, both.stderr
  assert len(both.stdout.strip().splitlines()) == 3 * 3
  assert sum("--match_dense=total_params" in l for l in both.stdout.splitlines()) == 3
  typo = _cli("research.sweep", f"--config={FAMILY}", "--baselines=active_flop", "--dry_run")
  assert typo.returncode != 0 and "--baselines" in typo.stderr and "active_params" in typo.stderr


def test_a_broken_sweep_json_is_one_line_naming_it(tmp_path):
  root = tmp_path / "sweep"
  root.mkdir()
  (root / "sweep.json").write_text("{broken")
  result = _cli("research.sweep", f"--config={FAMILY}", "--seeds=0", f"--root={root}")
  assert result.returncode == 1, result.stderr
  assert (
      result.stderr.strip()
      .splitlines()[-1]
      .startswith(f"research.sweep: {root / 'sweep.json'}: not valid JSON")
  ), result.stderr
  assert "Traceback" not in result.stderr
  assert (root / "sweep.json").read_text() == "{broken"  # Left as it was, nothing launched.
  assert [p.name for p in root.iterdir()] == ["sweep.json"]


# A smoke sweep short enough for the suite: every run trains 4 steps and evaluates twice.
_SHORT = (
    "--set=train.steps=4",
    "--set=train.warmup_steps=1",
    "--set=train.log_every=1",
    "--set=train.eval_every=2",
    "--set=train.eval_batches=1",
    "--set=train.checkpoint_every=4",
)


@pytest.mark.timeout(900)
def test_smoke_sweep_with_baseline_then_report_then_rerun_skips(tmp_path):
  root = tmp_path / "sweep"
  args = (
      f"--config={FAMILY},member=1",
      "--seeds=0,1",
      "--baselines=active_flops",
      f"--root={root}",
  )
  first = _cli("research.sweep", *args, *_SHORT, "--parallel=2")
  assert first.returncode == 0, first.stdout + first.stderr
  assert "0 of 4 runs complete, 4 to run" in first.stdout
  manifest = json.loads((root / "sweep.json").read_text())
  assert sorted((r["name"], r["seed"]) for r in manifest) == [
      ("topk-1_smoke", 0),
      ("topk-1_smoke", 1),
      ("topk-1_smoke_dense_active_flops", 0),
      ("topk-1_smoke_dense_active_flops", 1),
  ]

  again = _cli("research.sweep", *args, *_SHORT)
  assert again.returncode == 0 and "4 of 4 runs complete, 0 to run" in again.stdout

  report = _cli("research.report", str(root))
  assert report.returncode == 0, report.stderr
  assert "| topk-1_smoke | 2 |" in report.stdout and "gap vs dense active_flops" in report.stdout
  out = root / "report"
  data = json.loads((out / "report.json").read_text())
  sparse = next(c for c in data["configs"] if c["name"] == "topk-1_smoke")
  dense = next(c for c in data["configs"] if c["match"] == "active_flops")
  # The gap is recomputed here from the runs' own metrics files.
  final = lambda name, seed: [
      json.loads(l)["loss"]
      for l in (root / name / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
      if json.loads(l)["split"] == "eval"
  ][-1]
  mean = lambda name: (final(name, 0) + final(name, 1)) / 2
  assert sparse["gaps"]["active_flops"]["gap"] == pytest.approx(
      mean("topk-1_smoke") - mean(dense["name"]), abs=1e-9
  )
  for png in ("val_loss_steps", "val_loss_flops", "val_loss_wall", "expert_load", "dropped"):
    assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
