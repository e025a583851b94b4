"""The training loop: the loss falls, MFU is model FLOPs over the peak, resume is exact, workdirs are
guarded, and extending a run is an explicit, recorded choice."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import configs.dense
import configs.switch
from moe.config.config_dict import experiment_from_config_dict
from moe.layers.balancing import RouterBias
from moe.trainer import loop, trained_run
from moe.trainer.run_records import read_metrics

CONFIG_FILES = {"switch": configs.switch, "dense": configs.dense}


def smoke(name: str = "switch", **train_overrides):
  """configs/<name>.py:size=smoke, logging every step, with `train` fields overridden."""
  cd = CONFIG_FILES[name].get_config("size=smoke")
  cd.train.log_every = 1
  for key, value in train_overrides.items():
    cd.train[key] = value
  return cd


def records(workdir, split="train") -> list[dict]:
  return [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == split]


# ----------------------------------------------------------------------------------------------------
# The loop.


def test_smoke_switch_loss_falls(tmp_path):
  cd = smoke(steps=30, eval_every=30, checkpoint_every=30, peak_flops_per_device=1e12)
  cfg = experiment_from_config_dict(cd)
  final = loop.train_and_evaluate(cfg, str(tmp_path))
  recs = records(tmp_path)
  assert [r["step"] for r in recs] == list(range(1, 31))
  losses = [r["loss"] for r in recs]
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < first - 1.0, f"loss did not fall: first-5 mean {first:.3f}, last-5 mean {last:.3f}"
  assert final["step"] == 30 and final["loss"] == losses[-1]
  assert math.isfinite(final["eval_loss"]) and final["eval_loss"] < losses[0]
  # The logged rate is the schedule of moe/trainer/optimizer.py's docstring at the step taken:
  # linear warm-up from 0, then cosine decay to end_lr_fraction of the peak.
  tc, moe = cfg.train, cfg.model.moe
  assert tc.schedule.value == "cosine" and 0 < tc.warmup_steps < tc.steps
  n_sparse = cfg.model.num_sparse_layers
  for r in recs:
    t = r["step"] - 1  # Completed optimiser steps before this one.
    if t < tc.warmup_steps:
      expected_lr = tc.learning_rate * t / tc.warmup_steps
    else:
      cosine = (
          1 + math.cos(math.pi * min(1.0, (t - tc.warmup_steps) / (tc.steps - tc.warmup_steps)))
      ) / 2
      expected_lr = tc.learning_rate * (tc.end_lr_fraction + (1 - tc.end_lr_fraction) * cosine)
    assert r["learning_rate"] == pytest.approx(expected_lr, rel=1e-5, abs=1e-12)
    assert np.shape(r["dropped_fraction"]) == (n_sparse, moe.top_k)
    assert np.shape(r["expert_load"]) == (n_sparse, moe.num_experts)
    assert np.allclose(np.sum(r["expert_load"], axis=1), 1.0, atol=1e-5)
    assert len(r["router_entropy"]) == n_sparse
  assert {"perplexity", "grad_norm", "tokens_per_s"} <= set(recs[-1])
  # MFU = model FLOPs per second over the peak of all devices. Model FLOPs of the smoke switch model,
  # counted by hand (PaLM App. B: 6 N + 12 n_layers H Dh L per token, N the matmul weights a token
  # uses): d=64, 2 layers (layer 1 sparse), 2 heads of 32, dense hidden 256, 8 experts of 256, k=1,
  # vocabulary 258 (tied), L=64. The capacity slack (cf 1.25) is not model FLOPs.
  attention = 2 * 4 * 64 * 64  # q, k, v, o in each of 2 layers.
  ffn = 2 * 64 * 256  # The dense layer's MLP; the sparse layer's one expert is the same size.
  n = attention + ffn + 1 * ffn + 64 * 8 + 64 * 258  # + k experts + router + output logits.
  model_flops = 6 * n + 12 * 2 * 2 * 32 * 64
  assert model_flops == 790_272
  for r in recs:
    assert r["mfu"] == pytest.approx(
        r["tokens_per_s"] * model_flops / (1e12 * jax.device_count()), rel=1e-9
    )
  assert [r["step"] for r in records(tmp_path, "eval")] == [30]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["moe"]["num_experts"] == 8
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  # Relaunching the finished run reports it and writes nothing but the holder's name in its lock.
  files = lambda: sorted(
      (p, p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*") if p.name != "lock"
  )
  before = files()
  again = loop.train_and_evaluate(cfg, str(tmp_path))
  assert files() == before
  assert {k: again[k] for k in ("step", "loss", "eval_loss")} == {
      k: final[k] for k in ("step", "loss", "eval_loss")
  }


def test_resume_is_bit_identical(tmp_path):
  # Router jitter on, so the per-step RNG must be rebuilt from (seed, step) after the restart.
  cd = smoke(steps=10, checkpoint_every=5, eval_every=5, keep_checkpoints=3)
  cd.model.moe.jitter_eps = 0.01
  cfg = experiment_from_config_dict(cd)
  loop.train_and_evaluate(cfg, str(tmp_path))
  uninterrupted = records(tmp_path) + records(tmp_path, "eval")
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "5"]
  # A crash after step 5's checkpoint: the later checkpoint is gone, metrics.jsonl still holds steps
  # 6-10 (the resumed run drops and rewrites them).
  shutil.rmtree(tmp_path / "checkpoints" / "10")
  final = loop.train_and_evaluate(cfg, str(tmp_path))
  resumed = records(tmp_path) + records(tmp_path, "eval")
  assert [r["step"] for r in records(tmp_path)] == list(range(1, 11))
  drop_timing = lambda rs: [
      {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")} for r in rs
  ]
  assert drop_timing(resumed) == drop_timing(uninterrupted)  # Exact float equality, every field.
  assert final["loss"] == uninterrupted[9]["loss"]


def test_resume_with_router_biases_is_bit_identical(tmp_path):
  """Auxiliary-loss-free balancing with sigmoid scores: the biases are checkpointed with the run, and
  a run resumed from step 3 routes with step 3's biases (restored zeros would route differently)."""
  cd = smoke(steps=6, checkpoint_every=3, eval_every=3, keep_checkpoints=3)
  cd.model.moe.update(
      score="sigmoid", top_k=2, serving_order="token_major", balance="bias", bias_update_rate=0.05
  )
  cfg = experiment_from_config_dict(cd)
  loop.train_and_evaluate(cfg, str(tmp_path))
  uninterrupted = records(tmp_path) + records(tmp_path, "eval")
  saved = ocp.StandardCheckpointHandler().metadata(tmp_path / "checkpoints" / "3" / "state").tree
  assert "router_bias" in saved
  assert not any("router_bias" in m.name for m in jax.tree.leaves(saved["params"]))
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  loop.train_and_evaluate(cfg, str(tmp_path))
  resumed = records(tmp_path) + records(tmp_path, "eval")
  drop_timing = lambda rs: [
      {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")} for r in rs
  ]
  assert drop_timing(resumed) == drop_timing(uninterrupted)  # Exact float equality, every field.
  model, step = trained_run.load_model(tmp_path, cfg)
  bias = np.asarray(jax.tree.leaves(nnx.state(model, RouterBias))[0])
  assert step == 6 and np.abs(bias).max() > 0  # The read-only restore (sampling, evaluation) too.


def test_workdir_with_another_config_is_refused(tmp_path):
  first = experiment_from_config_dict(smoke("dense", warmup_steps=1, steps=3, eval_batches=0))
  loop.train_and_evaluate(first, str(tmp_path))
  other = experiment_from_config_dict(
      smoke("dense", warmup_steps=1, steps=2, eval_batches=0, learning_rate=1e-3)
  )
  with pytest.raises(ValueError, match=r"different config:\n  train.learning_rate: 0.003 -> 0.001"):
    loop.train_and_evaluate(other, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.003

  overwrite = experiment_from_config_dict(
      smoke("dense", warmup_steps=1, steps=2, eval_batches=0, learning_rate=1e-3, overwrite=True)
  )
  loop.train_and_evaluate(overwrite, str(tmp_path))
  # The old run (3 steps) is gone: otherwise its step-3 checkpoint would have been "resumed".
  assert [r["step"] for r in records(tmp_path)] == [1, 2]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.001

  # train.steps changes the schedule: refused unless train.allow_steps_change, then recorded.
  longer = smoke("dense", warmup_steps=1, steps=3, eval_batches=0, learning_rate=1e-3)
  with pytest.raises(ValueError, match=r"train.steps: 2 -> 3 \(changes the learning-rate schedule"):
    loop.train_and_evaluate(experiment_from_config_dict(longer), str(tmp_path))
  longer.train.allow_steps_change = True
  assert loop.train_and_evaluate(experiment_from_config_dict(longer), str(tmp_path))["step"] == 3
  assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
  history = [
      json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()
  ]
  assert [h["changes"] for h in history] == [
      [
          "train.allow_steps_change: False -> True",
          "train.overwrite: True -> False",
          "train.steps: 2 -> 3",
      ]
  ]
  assert history[0]["previous"]["train"]["steps"] == 2  # The original schedule stays on record.


# ----------------------------------------------------------------------------------------------------
# Torture: kill -9 anywhere, resume, end bit-identical.

REPO = pathlib.Path(__file__).resolve().parents[2]
TORTURE = [
    "--config=configs/switch.py:size=smoke",
    "--config.train.steps=24",
    "--config.train.checkpoint_every=4",
    "--config.train.log_every=1",
    "--config.train.eval_every=8",
]


def _launch(workdir, log_path):
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *TORTURE, f"--workdir={workdir}"],
      cwd=REPO,
      stdout=open(log_path, "w"),
      stderr=subprocess.STDOUT,
      env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
  )


def _final_state(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "24" / "state")


@pytest.mark.timeout(900)
def test_kill_9_anywhere_then_resume_ends_bit_identical(tmp_path):
  """SIGKILL at start-up, during compilation, mid-step and around a checkpoint save; every restart
  resumes, and the last checkpoint and every record equal an uninterrupted run's."""
  straight = tmp_path / "straight"
  assert _launch(straight, tmp_path / "s.log").wait(timeout=300) == 0
  workdir, log = tmp_path / "killed", tmp_path / "k.log"
  # (text to wait for in the log, extra delay in seconds) before each kill -9.
  # Start-up, compilation, mid-step before any checkpoint, and just as checkpoint 8 is being written.
  kill_points = [
      (None, 1.0),
      ("compiled the train step", 0.0),
      ("train step 3/", 0.0),
      ("train step 8/", 0.0),
  ]
  for text, delay in kill_points:
    proc = _launch(workdir, log)
    deadline = time.monotonic() + 200
    while text is not None and text not in log.read_text() and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    time.sleep(delay)
    proc.kill()
    proc.wait()
  assert _launch(workdir, log).wait(timeout=300) == 0, log.read_text()[-3000:]
  a, b = _final_state(straight), _final_state(workdir)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  timeless = lambda rs: [
      {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")} for r in rs
  ]
  assert timeless(records(workdir)) == timeless(records(straight))
  assert timeless(records(workdir, "eval")) == timeless(records(straight, "eval"))
