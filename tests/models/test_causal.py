"""Causal routing for decoders (issue 11, part 2): every MoE configuration a decoder accepts without
the acknowledgement (`MoEConfig.routing_is_causal`) lets no token's output depend on later tokens;
the rest are refused unless acknowledged. Layer by layer over the whole grid of router, dispatch,
top-k, priority and serving order, and once through the whole decoder."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config.enums import Dispatch, Priority, RouterKind, ServingOrder
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.layers.moe_layer import MoEFeedForward
from moe.models.transformer import build

B, L, D = 2, 16, 8


def _grid() -> list[MoEConfig]:
  """Every valid combination, with a capacity tight enough that claims drop (cf 0.5)."""
  configs = []
  for router, dispatch, k, priority, order in itertools.product(
      RouterKind, Dispatch, (1, 2), Priority, ServingOrder
  ):
    cf = None if dispatch is Dispatch.DROPLESS else 0.5
    try:
      configs.append(
          MoEConfig(
              num_experts=4,
              expert_hidden=16,
              router=router,
              dispatch=dispatch,
              top_k=k,
              priority=priority,
              serving_order=order,
              train_capacity_factor=cf,
              eval_capacity_factor=cf,
              min_capacity=0,
          )
      )
    except ValueError:  # Experts choose with dropless: refused, nothing to check.
      continue
  return configs


def _name(cfg: MoEConfig) -> str:
  parts = (cfg.router, cfg.dispatch, cfg.priority, cfg.serving_order)
  return "-".join(p.value for p in parts) + f"-k{cfg.top_k}"


GRID = _grid()
CAUSAL = [c for c in GRID if c.routing_is_causal]
NONCAUSAL = [c for c in GRID if not c.routing_is_causal]


def _decoder(moe: MoEConfig) -> ModelConfig:
  return ModelConfig(
      vocab_size=32, d_model=D, num_layers=2, num_heads=2, mlp_hidden=16, max_len=L, moe=moe
  )


def test_the_grid_splits_as_documented():
  """Causal: dropless, and index priority with top-1 or token-major order. Nothing else."""
  expected = {
      _name(c)
      for c in GRID
      if c.router is RouterKind.TOKENS_CHOOSE
      and (
          c.dispatch is Dispatch.DROPLESS
          or (
              c.priority is Priority.INDEX
              and (c.top_k == 1 or c.serving_order is ServingOrder.TOKEN_MAJOR)
          )
      )
  }
  assert {_name(c) for c in CAUSAL} == expected
  assert any(c.top_k == 2 and c.dispatch is not Dispatch.DROPLESS for c in CAUSAL)


def _layer(cfg: MoEConfig) -> MoEFeedForward:
  with nnx.use_eager_sharding(False):
    layer = MoEFeedForward(cfg, D, rngs=nnx.Rngs(0))
  layer.router.w[...] = layer.router.w[...] * 5.0  # Uneven routing: claims drop.
  return layer


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("cfg", CAUSAL, ids=_name)
def test_causal_routing_never_sees_later_tokens(cfg, group_size):
  """Tokens t+1..L-1 of every sequence replaced: outputs (and drops) at 0..t unchanged, bit for
  bit. Routing groups are whole sequences or pieces of one (group_size 8 of L=16)."""
  layer = _layer(dataclasses.replace(cfg, group_size=group_size))
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  y, _ = layer(x)
  _, kept = layer.routing_decisions(x)
  if cfg.dispatch is not Dispatch.DROPLESS:
    assert not np.asarray(kept).all(), "the test must exercise drops"
  for t in (2, 5, 9, 13):
    later = (jnp.arange(L) > t)[None, :, None]
    changed = jnp.where(later, 3.0 * jax.random.normal(jax.random.key(t), x.shape), x)
    y_changed, _ = layer(changed)
    np.testing.assert_array_equal(y_changed[:, : t + 1], y[:, : t + 1])


def test_rank_major_top2_with_capacity_does_see_later_tokens():
  """The check above has power: rank-major top-2 with a capacity leaks the future (a later first
  choice takes an earlier second choice's slot), and token-major order on the same layer does not.
  """
  common = dict(
      num_experts=4,
      expert_hidden=16,
      top_k=2,
      dispatch="einsum",
      train_capacity_factor=0.5,
      eval_capacity_factor=0.5,
      min_capacity=0,
  )
  rank_major = _layer(MoEConfig(**common, serving_order="rank_major"))
  token_major = _layer(MoEConfig(**common, serving_order="token_major"))
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  leaked = False
  for t in range(L - 1):
    later = (jnp.arange(L) > t)[None, :, None]
    changed = jnp.where(later, 3.0 * jax.random.normal(jax.random.key(t), x.shape), x)
    for layer in (rank_major, token_major):
      same = np.array_equal(layer(changed)[0][:, : t + 1], layer(x)[0][:, : t + 1])
      if layer is token_major:
        assert same
      else:
        leaked = leaked or not same
  assert leaked


@pytest.mark.parametrize("cfg", NONCAUSAL, ids=_name)
def test_noncausal_routing_needs_the_acknowledgement(cfg):
  with pytest.raises(ValueError, match=r"model.moe.allow_noncausal_routing=True"):
    _decoder(cfg)
  _decoder(dataclasses.replace(cfg, allow_noncausal_routing=True))


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_token_major_top2_decoder_logits_never_see_later_tokens(dispatch):
  """The whole decoder (causal attention, scanned layers) with token-major top-2 and a capacity."""
  moe = MoEConfig(
      num_experts=4,
      expert_hidden=16,
      top_k=2,
      dispatch=dispatch,
      serving_order="token_major",
      train_capacity_factor=0.5,
      eval_capacity_factor=0.5,
      min_capacity=0,
  )
  model = build(_decoder(moe))
  x = jax.random.randint(jax.random.key(0), (B, L), 0, 32)
  logits, aux = model(x)
  assert float(jnp.max(aux.stats.dropped_fraction)) > 0, "the test must exercise drops"
  for t in (3, 8, 12):
    changed = jnp.where(jnp.arange(L) > t, (x + 7) % 32, x)
    new_logits, _ = model(changed)
    np.testing.assert_array_equal(new_logits[:, : t + 1], logits[:, : t + 1])


# The recipes since 2024 leave causality as it was: sigmoid scores are per token, the selection bias
# is fixed during a forward pass (it is a function of earlier training steps' batches only, as a
# parameter is), and the pooled and per-sequence balance losses couple a batch's tokens through the
# gradient, as the per-group loss always has, never through the routing of the forward pass.
RECIPE = dict(score="sigmoid", balance="bias", balance_scope="global", sequence_balance_weight=1e-4)


@pytest.mark.parametrize("cfg", [c for c in CAUSAL if c.top_k == 2], ids=_name)
def test_recipes_keep_causal_routing_causal(cfg):
  """Sigmoid scores, a nonzero bias that moves choices, the global and per-sequence losses: outputs
  and losses aside, tokens 0..t route and compute as before when later tokens change."""
  recipe = dataclasses.replace(cfg, group_size=8, **RECIPE)
  assert recipe.routing_is_causal
  layer = _layer(recipe)
  layer.router_bias[...] = jnp.array([0.3, -0.2, 0.1, -0.25])
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  y, _ = layer(x, train=True)
  index, kept = layer.routing_decisions(x, train=True)
  layer.router_bias[...] = jnp.zeros(4)
  assert not np.array_equal(layer.routing_decisions(x, train=True)[0], index), "bias must matter"
  layer.router_bias[...] = jnp.array([0.3, -0.2, 0.1, -0.25])
  if cfg.dispatch is not Dispatch.DROPLESS:
    assert not np.asarray(kept).all(), "the test must exercise drops"
  for t in (2, 5, 9, 13):
    later = (jnp.arange(L) > t)[None, :, None]
    changed = jnp.where(later, 3.0 * jax.random.normal(jax.random.key(t), x.shape), x)
    y_changed, _ = layer(changed, train=True)
    np.testing.assert_array_equal(y_changed[:, : t + 1], y[:, : t + 1])


def test_recipes_do_not_change_what_is_causal():
  for cfg in GRID:
    if cfg.router is RouterKind.EXPERTS_CHOOSE:
      continue  # Experts choose refuses the recipes.
    recipe = RECIPE if cfg.top_k > 1 else {**RECIPE, "score": "softmax"}  # Sigmoid needs k >= 2.
    assert dataclasses.replace(cfg, **recipe).routing_is_causal == cfg.routing_is_causal
