"""benchmarks/: train_step's rows at smoke size against parameters and FLOPs counted by hand from the
configs' shapes, in this process (8 fake CPU devices, a made-up peak, step times fixed by the test) and
in a child process (one CPU device); its timing loop on a fake clock; the layer benchmark's records; and
the one-line refusals of all three before anything compiles.

moe_layer and moe_breakdown run as commands: absl flags are global, and the benchmarks define some
names twice with different meanings (--json in train_step and moe_layer, --experts in moe_layer and
moe_breakdown), so no two of them can be imported into one process.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from absl.testing import flagsaver

import benchmarks
from benchmarks import train_step
from moe.models import accounting

ROOT = pathlib.Path(__file__).resolve().parents[1]
DENSE, SWITCH = "configs/dense.py:size=smoke", "configs/switch.py:size=smoke"


def run_main(argv: list[str]) -> int:
  """`python -m benchmarks.train_step ARGV` in this process: the command's flag parsing, then main;
  the flags are back at their defaults afterwards."""
  with flagsaver.flagsaver():
    parse = benchmarks.flags_parser("benchmarks.train_step")
    return train_step.main(parse(["benchmarks.train_step", *argv]))


def hand_counts(cfg) -> dict:
  """Parameters and training FLOPs per token of a smoke config, from its shapes alone.

  Model FLOPs as PaLM counts them (Chowdhery et al. 2022, App. B): 6 N + 12 n_layers H Dh L per token,
  with N the matmul weights one token uses (attention projections, the dense FFNs, k experts and the
  router in a sparse layer, the output logits; not the embedding gather). Hardware FLOPs add what
  capacity-based dispatch computes beyond that: each of the E * C slots of a group of S tokens runs an
  expert, full or not, so (E * C / S - k) extra expert evaluations per token, 3 x 2 FLOPs per weight.
  Only GELU FFNs (two matrices) and one sequence per routing group, as the smoke configs have.
  """
  m = cfg.model
  d, layers, vocab, seq_len = m.d_model, m.num_layers, m.vocab_size, cfg.train.seq_len
  assert m.activation.value == "gelu" and m.tie_embeddings
  attention = 2 * d * m.num_heads * m.head_dim + 2 * d * m.num_kv_heads * m.head_dim  # q, o; k, v
  ffn = 2 * d * m.mlp_hidden
  norms = 2 * d * layers + d  # Two per layer and the final one.
  sparse = m.num_sparse_layers
  experts = router = active_experts = slack = 0
  if sparse:
    moe = m.moe
    assert moe.group_size is None and moe.dispatch.value == "gather"
    expert = 2 * d * moe.expert_hidden
    experts, active_experts, router = (
        moe.num_experts * expert,
        moe.top_k * expert,
        d * moe.num_experts,
    )
    # C = min(S, max(ceil(cf * k * S / E), min_capacity)), S = one sequence (Switch, Fedus et al. 2021).
    s = seq_len
    c = min(
        s,
        max(
            math.ceil(moe.train_capacity_factor * moe.top_k * s / moe.num_experts), moe.min_capacity
        ),
    )
    slack = 3 * 2 * sparse * (moe.num_experts * c / s - moe.top_k) * expert
  shared = vocab * d + layers * attention + norms + (layers - sparse) * ffn + sparse * router
  used = (
      layers * attention + (layers - sparse) * ffn + sparse * (active_experts + router) + d * vocab
  )
  model_flops = 6 * used + 12 * layers * m.num_heads * m.head_dim * seq_len
  return dict(
      params_total=shared + sparse * experts,
      params_active=shared + sparse * active_experts,
      model_flops_per_token=model_flops,
      hardware_flops_per_token=model_flops + slack,
  )


def check_row(row: dict, cfg, spec: str, golden: dict) -> None:
  """What a row says of its config, whatever the device: the hand counts, the batch, the loss."""
  counts = hand_counts(cfg)
  # The hand counts at the smoke shapes (d=64, 2 layers of 2 heads of 32, FFN 256, vocabulary 258,
  # L=64; switch: layer 2 of 2 sparse with 8 experts of 256, k=1, cf 1.25 -> C=10). A change here
  # means the smoke size changed.
  assert counts == golden
  for field, value in counts.items():
    assert row[field] == value, field
  assert (row["config"], row["name"], row["dtype"]) == (spec, cfg.name, "float32")
  assert (row["global_batch_size"], row["seq_len"], row["tokens_per_step"]) == (8, 64, 8 * 64)
  assert row["warmup"] == 1 and row["steps"] == 3  # As asked on the command line.
  # Uniform random targets: no model beats their cross-entropy ln V on average (targets equal to the
  # inputs would: tied embeddings score the input token highest from the first step).
  assert math.isfinite(row["final_loss"]) and row["final_loss"] > math.log(258) - 0.05
  # The step's arguments alone hold the float32 parameters and Adam's two moments.
  assert row["peak_memory_bytes"] >= 3 * 4 * counts["params_total"]


DENSE_COUNTS = dict(
    params_total=115_136,
    params_active=115_136,
    model_flops_per_token=787_200,
    hardware_flops_per_token=787_200,
)
SWITCH_COUNTS = dict(
    params_total=345_024,
    params_active=115_648,
    model_flops_per_token=790_272,
    hardware_flops_per_token=790_272 + 49_152,  # 3 x 2 x (80 / 64 - 1) x 32768 capacity slack.
)


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
    train_step.counterpart_specs(SWITCH)


def test_time_steps_times_each_step_after_the_warmup(monkeypatch):
  """On a fake clock: only the steps after the warm-up are timed, each one's own duration; each step
  takes the state the last one returned (it was donated) and the batches cycle."""
  durations, now, calls = [9.0, 7.0, 1.0, 4.0, 2.0], [0.0], []

  def step(state, batch):
    calls.append((state, batch))
    now[0] += durations[len(calls) - 1]
    return state + 1, {"loss": float(len(calls))}

  monkeypatch.setattr(train_step.time, "perf_counter", lambda: now[0])
  times, metrics = train_step.time_steps(step, 0, ["a", "b"], steps=3, warmup=2)
  assert times == [1.0, 4.0, 2.0]
  assert calls == [(0, "a"), (1, "b"), (2, "a"), (3, "b"), (4, "a")]
  assert metrics == {"loss": 5.0}


def test_in_process_row_on_eight_devices(monkeypatch, capsys):
  """The dense smoke model on the 8 fake devices (conftest), `--json=-`: the JSON alone on stdout, the
  table on stderr. A made-up peak of 0.2 GFLOP/s per device, and step times fixed by the test (after
  the real loop ran), so the row's times, tokens/s, MFU and HFU are known exactly."""
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(accounting, "peak_flops_per_device", lambda kind, dtype: 2e8)
  timed, real_time_steps = [], train_step.time_steps

  def fixed_times(compiled, state, batches, *, steps, warmup):
    times, metrics = real_time_steps(compiled, state, batches, steps=steps, warmup=warmup)
    timed.append(len(times))
    return [0.5, 0.25, 1.0], metrics

  monkeypatch.setattr(train_step, "time_steps", fixed_times)
  assert run_main([f"--config={DENSE}", "--steps=3", "--warmup=1", "--json=-"]) == 0
  out, err = capsys.readouterr()
  (row,) = json.loads(out)
  assert timed == [3]
  check_row(row, train_step.load_experiment(DENSE), DENSE, DENSE_COUNTS)
  assert (row["device_kind"], row["num_devices"]) == (jax.devices()[0].device_kind, 8)
  assert (row["step_time_s"], row["step_time_min_s"], row["step_time_max_s"]) == (0.5, 0.25, 1.0)
  assert row["tokens_per_s"] == 512 / 0.5
  # MFU = model FLOPs/token x tokens/s / (peak x devices); a dense model computes nothing more.
  assert row["peak_flops_per_device"] == 2e8
  assert row["mfu"] == pytest.approx(787_200 * 1024 / (8 * 2e8), rel=1e-12)
  assert row["hfu"] == pytest.approx(787_200 * 1024 / (8 * 2e8), rel=1e-12)
  assert f"| {DENSE} | 0.12M / 0.12M | float32 | 8 x 64 |" in err
  assert "| 500.0 | 1,024 | 0.0008 | 50.4% | 50.4% |" in err


def test_child_process_row_on_one_cpu_device(monkeypatch, capsys):
  """The switch smoke model through the command in a child process (what each of several configs
  runs), on one CPU device: no peak FLOP/s for a CPU, so no MFU; hardware FLOPs = model FLOPs + the
  capacity slack."""
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("XLA_FLAGS", "")  # The child sees one CPU device.
  row = train_step.measure_in_child(SWITCH, steps=3, warmup=1, batch=None)
  assert "error" not in row, row
  check_row(row, train_step.load_experiment(SWITCH), SWITCH, SWITCH_COUNTS)
  assert (row["device_kind"], row["num_devices"]) == ("cpu", 1)
  assert row["peak_flops_per_device"] is None and row["mfu"] is None and row["hfu"] is None
  assert row["memory_source"] == "compiled memory_analysis"  # A CPU reports no memory_stats.
  assert f"| {SWITCH} | 0.35M / 0.12M |" in capsys.readouterr().err  # The child's table, passed on.


def test_a_failing_child_gives_an_error_row(monkeypatch):
  # With several configs each runs in a child process; one that fails is a row, not the end of the run.
  monkeypatch.chdir(ROOT)
  row = train_step.measure_in_child("configs/switch.py:size=nosuch", steps=1, warmup=0, batch=None)
  assert row["config"] == "configs/switch.py:size=nosuch"
  assert row["error"].startswith("exit status 1") and "size must be one of" in row["error"]
  assert "failed: exit status 1" in train_step.format_table([row])


@pytest.mark.parametrize(
    "argv,message",
    [
        ([f"--config={SWITCH.replace('smoke', 'nosuch')}"], "size must be one of smoke, tiny,"),
        (
            [f"--config={SWITCH}", "--sparse_counterparts"],
            "--sparse_counterparts needs a configs/dense",
        ),
        (["--config=configs/nothere.py"], "No such file or directory: 'configs/nothere.py'"),
        ([f"--config={SWITCH}", "--batch=0"], "flag --batch=0: 0 is not a positive integer"),
        ([f"--config={SWITCH}", "--steps=0"], "flag --steps=0: 0 is not a positive integer"),
        (
            [f"--config={SWITCH}", "--warmup=-1"],
            "flag --warmup=-1: -1 is not a non-negative integer",
        ),
        ([], "Flag --config must have a value other than None"),
        (
            [f"--config={SWITCH}", "--batch=3"],
            f"--config={SWITCH} --batch=3: train.global_batch_size=3 must be divisible by the "
            "data-parallel size 8",
        ),
    ],
)
def test_train_step_refusals(argv, message, monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(SystemExit) as exit_info:
    run_main(argv)
  text = str(exit_info.value.code)
  assert text.startswith("benchmarks.train_step: ") and message in text and "\n" not in text


def _command(module: str, *argv: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", module, *argv],
      cwd=ROOT,
      env={**os.environ, "XLA_FLAGS": ""},
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_layer_benchmark_records():
  """--json: one record per (path, E, k) on stdout, dense added once per k as the baseline, a path
  this backend lacks skipped with its reason on stderr. Tiny shapes: the flags, not the timings."""
  result = _command(
      "benchmarks.moe_layer",
      *("--tokens=64", "--seq_len=32", "--d_model=16", "--hidden=32", "--experts=2,4", "--top_k=1"),
      *("--iters=1", "--paths=dropless-xla,dropless-tokamax", "--json"),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [(r["path"], r["experts"], r["top_k"]) for r in records] == [
      ("dense", 0, 1),
      ("dropless-xla", 2, 1),
      ("dropless-xla", 4, 1),
  ]
  assert (
      "# skipped dropless-tokamax: moe.grouped_matmul='tokamax' is not available" in result.stderr
  )


@pytest.mark.parametrize(
    "module,argv,message",
    [
        (
            "benchmarks.moe_layer",
            ["--tokens=100", "--seq_len=64"],
            "benchmarks.moe_layer: --tokens=100 must be a multiple of --seq_len=64",
        ),
        (
            "benchmarks.moe_breakdown",
            ["--preset=tpu"],
            "benchmarks.moe_breakdown: flag --preset=tpu: value should be one of <cpu|gpu|gpu-large>",
        ),
    ],
)
def test_layer_benchmark_refusals(module, argv, message):
  result = _command(module, *argv)
  assert result.returncode == 1 and result.stderr.strip() == message
