"""Training: the loss falls, resume is exact, workdirs are guarded, the decay mask and the schedule."""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import accounting, optim, presets, train
from moe.config import ModelConfig, MoEConfig, TrainConfig, experiment_from_config_dict
from moe.model import build



def smoke(name: str = "switch", **train_overrides):
  """configs/<name>.py:size=smoke, logging every step, with `train` fields overridden."""
  cd = presets.load_config(name, "size=smoke")
  cd.train.log_every = 1
  for key, value in train_overrides.items():
    cd.train[key] = value
  return cd


def records(workdir, split="train") -> list[dict]:
  return [r for r in train.read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
          if r["split"] == split]


# ----------------------------------------------------------------------------------------------------
# The loop.


def test_smoke_switch_loss_falls(tmp_path):
  cd = smoke(steps=30, eval_every=30, checkpoint_every=30, peak_flops_per_device=1e12)
  cfg = experiment_from_config_dict(cd)
  final = train.train_and_evaluate(cfg, str(tmp_path))
  recs = records(tmp_path)
  assert [r["step"] for r in recs] == list(range(1, 31))
  losses = [r["loss"] for r in recs]
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < first - 1.0, f"loss did not fall: first-5 mean {first:.3f}, last-5 mean {last:.3f}"
  assert final["step"] == 30 and final["loss"] == losses[-1]
  assert math.isfinite(final["eval_loss"]) and final["eval_loss"] < losses[0]
  assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
  # The loss is CE + weighted mean aux losses; the logged rate is the schedule's at the step taken.
  moe = cfg.model.moe
  schedule = optim.learning_rate_schedule(cfg.train)
  n_sparse = cfg.model.num_sparse_layers
  for r in recs:
    assert r["loss"] == pytest.approx(
        r["ce"] + moe.balance_loss_weight * r["balance_loss"] + moe.z_loss_weight * r["z_loss"],
        rel=1e-6)
    assert r["learning_rate"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)
    assert np.shape(r["dropped_fraction"]) == (n_sparse, moe.top_k)
    assert np.shape(r["expert_load"]) == (n_sparse, moe.num_experts)
    assert np.allclose(np.sum(r["expert_load"], axis=1), 1.0, atol=1e-5)
    assert len(r["router_entropy"]) == n_sparse
  assert {"perplexity", "grad_norm", "tokens_per_s"} <= set(recs[-1])
  # MFU = model FLOPs per second over the peak of all devices.
  flops = accounting.flops_per_token(cfg.model, cfg.train.seq_len).total
  for r in recs:
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / (1e12 * jax.device_count()), rel=1e-9)
  assert [r["step"] for r in records(tmp_path, "eval")] == [30]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["moe"]["num_experts"] == 8
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_is_bit_identical(tmp_path):
  # Router jitter on, so the per-step RNG must be rebuilt from (seed, step) after the restart.
  cd = smoke(steps=10, checkpoint_every=5, eval_every=5, keep_checkpoints=3)
  cd.model.moe.jitter_eps = 0.01
  cfg = experiment_from_config_dict(cd)
  train.train_and_evaluate(cfg, str(tmp_path))
  uninterrupted = records(tmp_path) + records(tmp_path, "eval")
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "5"]
  # A crash after step 5's checkpoint: the later checkpoint is gone, metrics.jsonl still holds steps
  # 6-10 (the resumed run drops and rewrites them).
  shutil.rmtree(tmp_path / "checkpoints" / "10")
  final = train.train_and_evaluate(cfg, str(tmp_path))
  resumed = records(tmp_path) + records(tmp_path, "eval")
  assert [r["step"] for r in records(tmp_path)] == list(range(1, 11))
  drop_timing = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")}
                            for r in rs]
  assert drop_timing(resumed) == drop_timing(uninterrupted)  # Exact float equality, every field.
  assert final["loss"] == uninterrupted[9]["loss"]


def test_workdir_with_another_config_is_refused(tmp_path):
  first = experiment_from_config_dict(smoke("dense", steps=3, eval_batches=1))
  train.train_and_evaluate(first, str(tmp_path))
  other = experiment_from_config_dict(smoke("dense", steps=2, eval_batches=1, learning_rate=1e-3))
  with pytest.raises(ValueError, match=r"different config:\n  train.learning_rate: 0.003 -> 0.001"):
    train.train_and_evaluate(other, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.003

  overwrite = experiment_from_config_dict(
      smoke("dense", steps=2, eval_batches=1, learning_rate=1e-3, overwrite=True))
  train.train_and_evaluate(overwrite, str(tmp_path))
  # The old run (3 steps) is gone: otherwise its step-3 checkpoint would have been "resumed".
  assert [r["step"] for r in records(tmp_path)] == [1, 2]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.001

  # train.steps may change (extending a run); it resumes from step 2.
  longer = experiment_from_config_dict(smoke("dense", steps=3, eval_batches=1, learning_rate=1e-3))
  assert train.train_and_evaluate(longer, str(tmp_path))["step"] == 3
  assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]


def test_config_differences_ignores_resumable_fields():
  cfg = experiment_from_config_dict(smoke("switch"))
  old = train.config_to_json(cfg)
  new = json.loads(json.dumps(old))
  new["train"].update(steps=999, log_every=7, overwrite=True)
  new["name"] = "renamed"
  assert train.config_differences(old, new) == []
  new["model"]["moe"]["num_experts"] = 4
  assert train.config_differences(old, new) == ["model.moe.num_experts: 8 -> 4"]


# ----------------------------------------------------------------------------------------------------
# The optimiser.


def _model_cfg(scan_layers: bool) -> ModelConfig:
  moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, activation="swiglu",
                  shared_expert_hidden=16)
  return ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=2, mlp_hidden=64,
                     tie_embeddings=False, moe=moe, sparse_every=2, scan_layers=scan_layers,
                     max_len=16)


def _expected_decay(path: tuple) -> bool:
  """Independent statement of the rule for this model: norm scales and the input embedding only."""
  names = [p for p in path if isinstance(p, str)]
  if names == ["embed"]:
    return False
  if names[-1] == "scale" and names[-2] in ("attention_norm", "ffn_norm", "final_norm"):
    return False
  return True


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_mask_leaf_by_leaf(scan_layers):
  _, params = nnx.split(build(_model_cfg(scan_layers)), nnx.Param)
  mask = dict(nnx.to_flat_state(optim.weight_decay_mask(params)))
  flat = dict(nnx.to_flat_state(params))
  assert mask.keys() == flat.keys()
  for path, decayed in mask.items():
    assert decayed == _expected_decay(path), (path, flat[path].get_value().shape)
  names = {p for path in flat for p in path if isinstance(p, str)}
  assert {"unembed", "router", "experts", "shared_expert", "w_gate", "q", "o"} <= names
  # With scanned layers the norm scales are [layers, d]: rank alone would have decayed them.
  norm_ranks = {flat[p].get_value().ndim for p in flat if p[-1] == "scale"}
  assert norm_ranks == ({1, 2} if scan_layers else {1})


def test_optimizer_applies_the_mask():
  """Zero gradients: a decayed parameter shrinks by lr * wd, an undecayed one stays put."""
  _, params = nnx.split(build(_model_cfg(True)), nnx.Param)
  cfg = TrainConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5,
                    grad_clip_norm=1.0)
  tx = optim.make_optimizer(cfg, params)
  pure = nnx.as_pure(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(pure), pure)
  mask = dict(nnx.to_flat_state(optim.weight_decay_mask(params)))
  for path, update in nnx.to_flat_state(updates):
    value = dict(nnx.to_flat_state(pure))[path]
    expected = -0.1 * 0.5 * value if mask[path] else jnp.zeros_like(value)
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-9, err_msg=str(path))


def test_decays_rule_by_name_and_rank():
  matrix = jnp.zeros((4, 4))
  assert optim.decays(("blocks", 0, "w_in"), matrix)
  assert optim.decays(("unembed",), matrix)
  for path in [("embed",), ("tok_embed",), ("wte",), ("final_norm", "w"), ("ln1", "w"), ("bias",),
               ("experts", "w_in_bias")]:
    assert not optim.decays(path, matrix), path
  assert not optim.decays(("w",), jnp.zeros((4,)))


# ----------------------------------------------------------------------------------------------------
# The schedule.


def _lr(cfg: TrainConfig, step: int) -> float:
  return float(optim.learning_rate_schedule(cfg)(step))


def test_schedules_against_formulas():
  peak, warmup, steps, end = 1e-3, 10, 110, 0.1
  cos = TrainConfig(learning_rate=peak, warmup_steps=warmup, steps=steps, end_lr_fraction=end)
  for step, want in [(0, 0.0), (5, peak * 0.5), (10, peak), (60, peak * (end + (1 - end) * 0.5)),
                     (35, peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * 0.25)))),
                     (110, peak * end), (500, peak * end)]:
    assert _lr(cos, step) == pytest.approx(want, rel=1e-5, abs=1e-12), step
  rsqrt = TrainConfig(learning_rate=peak, warmup_steps=100, steps=1000, schedule="rsqrt")
  for step, want in [(50, peak * 0.5), (100, peak), (400, peak * 0.5), (10_000, peak * 0.1)]:
    assert _lr(rsqrt, step) == pytest.approx(want, rel=1e-5), step
  const = TrainConfig(learning_rate=peak, warmup_steps=4, steps=100, schedule="constant")
  for step, want in [(1, peak / 4), (4, peak), (99, peak)]:
    assert _lr(const, step) == pytest.approx(want, rel=1e-6), step
  no_warmup = TrainConfig(learning_rate=peak, warmup_steps=0, steps=100, end_lr_fraction=0.0)
  assert _lr(no_warmup, 0) == pytest.approx(peak) and _lr(no_warmup, 100) == pytest.approx(0.0)


def test_optimizer_follows_the_schedule():
  """The optimiser itself (not only the logged rate) uses the schedule: with weight decay only, the
  update at step t is -lr(t) * wd * w, so it is zero at step 0 of the warmup and grows linearly."""
  _, params = nnx.split(build(_model_cfg(True)), nnx.Param)
  cfg = TrainConfig(learning_rate=0.1, warmup_steps=4, schedule="cosine", weight_decay=0.5, steps=20)
  tx = optim.make_optimizer(cfg, params)
  pure = nnx.as_pure(params)
  zeros = jax.tree.map(jnp.zeros_like, pure)
  state = tx.init(pure)
  path, w = next((p, v) for p, v in nnx.to_flat_state(pure)
                 if dict(nnx.to_flat_state(optim.weight_decay_mask(params)))[p])
  for step in range(3):
    updates, state = tx.update(zeros, state, pure)
    np.testing.assert_allclose(dict(nnx.to_flat_state(updates))[path], -_lr(cfg, step) * 0.5 * w,
                               rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
  assert _lr(cfg, 0) == 0.0 and _lr(cfg, 2) > 0
