"""benchmarks.train_step at smoke size: the JSON rows it writes, in this process (8 fake CPU devices)
and as a command on one CPU device, and the refusals before anything compiles."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from benchmarks import train_step
from moe.models import accounting

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = (
    "config name device_kind num_devices dtype global_batch_size seq_len tokens_per_step "
    "params_total params_active compile_s step_time_s step_time_min_s step_time_max_s tokens_per_s "
    "model_flops_per_token hardware_flops_per_token peak_flops_per_device mfu hfu "
    "peak_memory_bytes memory_source final_loss"
).split()


def check_row(row: dict, spec: str, num_devices: int) -> None:
  """What every row must satisfy, whatever the device."""
  assert set(FIELDS) <= set(row), set(FIELDS) - set(row)
  assert row["config"] == spec and row["num_devices"] == num_devices
  assert (row["global_batch_size"], row["seq_len"]) == (8, 64)  # The smoke size's batch.
  assert row["tokens_per_step"] == 8 * 64
  assert 0 < row["step_time_min_s"] <= row["step_time_s"] <= row["step_time_max_s"]
  assert row["compile_s"] > 0
  assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_time_s"], rel=1e-9)
  assert row["peak_memory_bytes"] > 0
  assert math.isfinite(row["final_loss"])


def test_counterpart_specs_keep_size_and_data():
  specs = train_step.counterpart_specs("configs/dense.py:size=base,data=lm1b,match=switch8")
  assert specs == [
      "configs/dense.py:size=base,data=lm1b,match=switch8",
      "configs/switch.py:size=base,data=lm1b",
      "configs/top2.py:size=base,data=lm1b",
  ]
  assert train_step.counterpart_specs("configs/dense.py")[1:] == [
      "configs/switch.py",
      "configs/top2.py",
  ]
  with pytest.raises(ValueError, match="needs a configs/dense.py spec"):
    train_step.counterpart_specs("configs/switch.py:size=smoke")


def test_in_process_rows_and_utilisation(tmp_path, monkeypatch):
  # 8 fake devices (conftest); a made-up peak of 1 TFLOP/s per device to check the MFU arithmetic.
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(accounting, "peak_flops_per_device", lambda kind, dtype: 1e12)
  spec, out = "configs/dense.py:size=smoke", tmp_path / "rows.json"
  assert train_step.main([f"--config={spec}", "--steps=3", "--warmup=1", f"--json={out}"]) == 0
  (row,) = json.loads(out.read_text())
  check_row(row, spec, jax.device_count())
  assert row["device_kind"] == jax.devices()[0].device_kind
  peak = 1e12 * jax.device_count()
  assert row["mfu"] == pytest.approx(row["model_flops_per_token"] * row["tokens_per_s"] / peak)
  assert row["hfu"] == pytest.approx(row["hardware_flops_per_token"] * row["tokens_per_s"] / peak)
  # Dense: nothing is computed beyond the model FLOPs.
  assert row["hfu"] == row["mfu"]
  assert row["params_total"] == row["params_active"]


def test_command_on_one_cpu_device_has_no_mfu():
  spec = "configs/switch.py:size=smoke"
  command = [sys.executable, "-m", "benchmarks.train_step", f"--config={spec}"]
  result = subprocess.run(
      command + ["--steps=3", "--warmup=1", "--json", "-"],
      cwd=ROOT,
      env={**os.environ, "XLA_FLAGS": ""},
      capture_output=True,
      text=True,
      timeout=240,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  (row,) = json.loads(result.stdout)  # The JSON alone on stdout; the table went to stderr.
  check_row(row, spec, 1)
  assert row["device_kind"] == "cpu"
  assert row["peak_flops_per_device"] is None and row["mfu"] is None and row["hfu"] is None
  assert row["memory_source"] == "compiled memory_analysis"  # A CPU reports no memory_stats.
  # Switch at cf 1.25: capacity slack is computed (hardware) but is not model FLOPs.
  assert row["hardware_flops_per_token"] > row["model_flops_per_token"]
  assert f"| {spec} |" in result.stderr and "| n/a | n/a |" in result.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config=configs/switch.py:size=nosuch"], "size must be one of smoke"),
        (
            ["--config=configs/switch.py:size=smoke", "--sparse_counterparts"],
            "needs a configs/dense",
        ),
        (["--config=configs/nothere.py"], "No such file"),
        (["--config=configs/switch.py:size=smoke", "--batch=0"], "--batch=0 must be >= 1"),
    ],
)
def test_refusals_before_compiling(argv, message, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  with pytest.raises(SystemExit) as exit_info:
    train_step.main(argv)
  assert message in str(exit_info.value.code) + capsys.readouterr().err


def test_a_failing_child_gives_an_error_row():
  # With several configs each runs in a child process; one that fails is a row, not the end of the run.
  args = train_step.parse_args(["--config=unused", "--steps=1", "--warmup=0"])
  row = train_step.measure_in_child("configs/switch.py:size=nosuch", args)
  assert row["config"] == "configs/switch.py:size=nosuch"
  assert row["error"].startswith("exit status 1") and "size must be one of" in row["error"]
  assert "failed: exit status 1" in train_step.format_table([row])
