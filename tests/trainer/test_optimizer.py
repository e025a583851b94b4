"""The optimiser: the weight-decay mask, leaf by leaf, and the learning-rate schedules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig
from moe.models.transformer import build
from moe.trainer import optimizer


def _model_cfg(scan_layers: bool) -> ModelConfig:
  moe = MoEConfig(
      num_experts=4,
      top_k=2,
      expert_hidden=32,
      activation="swiglu",
      shared_expert_hidden=16,
      allow_noncausal_routing=True,
  )
  return ModelConfig(
      vocab_size=64,
      d_model=32,
      num_layers=4,
      num_heads=2,
      mlp_hidden=64,
      tie_embeddings=False,
      moe=moe,
      sparse_every=2,
      scan_layers=scan_layers,
      max_len=16,
  )


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
  mask = dict(nnx.to_flat_state(optimizer.weight_decay_mask(params)))
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
  cfg = TrainConfig(
      learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip_norm=1.0
  )
  tx = optimizer.make_optimizer(cfg, params)
  pure = nnx.as_pure(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(pure), pure)
  mask = dict(nnx.to_flat_state(optimizer.weight_decay_mask(params)))
  for path, update in nnx.to_flat_state(updates):
    value = dict(nnx.to_flat_state(pure))[path]
    expected = -0.1 * 0.5 * value if mask[path] else jnp.zeros_like(value)
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-9, err_msg=str(path))


def test_decays_rule_by_name_and_rank():
  matrix = jnp.zeros((4, 4))
  assert optimizer.decays(("blocks", 0, "w_in"), matrix)
  assert optimizer.decays(("unembed",), matrix)
  for path in [
      ("embed",),
      ("tok_embed",),
      ("wte",),
      ("final_norm", "w"),
      ("ln1", "w"),
      ("bias",),
      ("experts", "w_in_bias"),
  ]:
    assert not optimizer.decays(path, matrix), path
  assert not optimizer.decays(("w",), jnp.zeros((4,)))


# ----------------------------------------------------------------------------------------------------
# The schedule.


def _lr(cfg: TrainConfig, step: int) -> float:
  return float(optimizer.learning_rate_schedule(cfg)(step))


def test_schedules_against_formulas():
  peak, warmup, steps, end = 1e-3, 10, 110, 0.1
  cos = TrainConfig(learning_rate=peak, warmup_steps=warmup, steps=steps, end_lr_fraction=end)
  for step, want in [
      (0, 0.0),
      (5, peak * 0.5),
      (10, peak),
      (60, peak * (end + (1 - end) * 0.5)),
      (35, peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * 0.25)))),
      (110, peak * end),
      (500, peak * end),
  ]:
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
  cfg = TrainConfig(
      learning_rate=0.1, warmup_steps=4, schedule="cosine", weight_decay=0.5, steps=20
  )
  tx = optimizer.make_optimizer(cfg, params)
  pure = nnx.as_pure(params)
  zeros = jax.tree.map(jnp.zeros_like, pure)
  state = tx.init(pure)
  path, w = next(
      (p, v)
      for p, v in nnx.to_flat_state(pure)
      if dict(nnx.to_flat_state(optimizer.weight_decay_mask(params)))[p]
  )
  for step in range(3):
    updates, state = tx.update(zeros, state, pure)
    np.testing.assert_allclose(
        dict(nnx.to_flat_state(updates))[path],
        -_lr(cfg, step) * 0.5 * w,
        rtol=1e-6,
        atol=1e-12,
        err_msg=f"step {step}",
    )
  assert _lr(cfg, 0) == 0.0 and _lr(cfg, 2) > 0
