"""KV-cache decoding (moe/models/decode.py): a prefill then one token at a time gives, at every position, the
logits of the full forward pass over the same tokens, for dense and sparse models (causal top-1 in
index order with room for every claim, and dropless), scanned and unrolled, with grouped-query
attention; decode-time MoE routing is dropless even where the full pass drops; experts choose is
refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.models import decode
from moe.models.transformer import build

V, MAX_LEN, PROMPT = 40, 12, 5


def _cfg(moe: MoEConfig | None = None, **kw) -> ModelConfig:
  base = dict(
      vocab_size=V,
      d_model=16,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      mlp_hidden=24,
      max_len=MAX_LEN,
      moe=moe,
      sparse_every=2,
  )
  base.update(kw)
  return ModelConfig(**base)


def _moe(**kw) -> MoEConfig:
  return MoEConfig(num_experts=4, expert_hidden=24, min_capacity=1, **kw)


CASES = {
    # Dense, grouped-query (4 query heads over 2 key/value heads), one scanned period.
    "dense_gqa_scan": _cfg(),
    # Switch top-1 in index order (causal); eval capacity factor None: C = S, nothing drops. Five
    # layers, first_dense=1: one unrolled dense layer, then a [dense, sparse] period scanned twice.
    "switch_einsum_prefix_scan": _cfg(
        _moe(dispatch="einsum", eval_capacity_factor=None), num_layers=5, first_dense=1
    ),
    # Switch top-1, gather, a capacity factor of E (C = S), unrolled, multi-head.
    "switch_gather_unrolled": _cfg(
        _moe(dispatch="gather", eval_capacity_factor=4.0), num_kv_heads=4, scan_layers=False
    ),
    # Dropless top-2, every layer sparse, scanned, grouped-query.
    "dropless_top2_scan": _cfg(
        _moe(
            top_k=2,
            dispatch="dropless",
            train_capacity_factor=None,
            eval_capacity_factor=None,
        ),
        sparse_every=1,
    ),
}


_full_forward = jax.jit(
    lambda graphdef, state, tokens_BL: nnx.merge(graphdef, state)(tokens_BL), static_argnums=0
)
_cached_forward = jax.jit(
    lambda graphdef, state, tokens_BT, cache: decode.forward(
        nnx.merge(graphdef, state), tokens_BT, cache
    ),
    static_argnums=0,
)


def _decode_logits(model, tokens_BL: jax.Array) -> np.ndarray:
  """Logits at every position: a prefill over the first PROMPT tokens, then one token at a time."""
  model = decode.decoding_model(model)
  graphdef, state = nnx.split(model)
  cache = decode.init_cache(model, tokens_BL.shape[0])
  logits_BPV, cache = _cached_forward(graphdef, state, tokens_BL[:, :PROMPT], cache)
  steps = [logits_BPV]
  for t in range(PROMPT, tokens_BL.shape[1]):
    logits_B1V, cache = _cached_forward(graphdef, state, tokens_BL[:, t : t + 1], cache)
    assert int(cache.length) == t + 1
    steps.append(logits_B1V)
  return np.asarray(jnp.concatenate(steps, axis=1))


def _tokens(batch=2, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, MAX_LEN), 0, V)


@pytest.mark.parametrize("name", CASES)
def test_cached_decoding_equals_the_full_forward_pass(name):
  cfg = CASES[name]
  model = build(cfg, seed=3)
  tokens = _tokens()
  full_BLV, aux = _full_forward(*nnx.split(model), tokens)
  if aux is not None:  # The premise: the full pass drops nothing, so the two must agree.
    assert float(jnp.max(jnp.abs(aux.stats.dropped_fraction))) < 1e-6
  np.testing.assert_allclose(_decode_logits(model, tokens), full_BLV, atol=1e-5, rtol=1e-5)


def test_the_cache_holds_kv_heads_per_layer_stacked_like_the_parameters():
  model = build(CASES["switch_einsum_prefix_scan"], seed=0)
  assert (model.prefix_len, model.period_len, model.repeats) == (1, 2, 2)
  cache = decode.init_cache(model, batch=3)
  assert [c.k_BQMH.shape for c in cache.prefix] == [(3, MAX_LEN, 2, 4)]
  assert [c.v_BQMH.shape for c in cache.periods] == [(2, 3, MAX_LEN, 2, 4)] * 2
  assert int(cache.length) == 0


def test_decoding_routes_dropless_where_the_full_pass_drops():
  """The documented decision: one token per step, per-sequence groups, no drops, the prefill too."""
  moe = _moe(dispatch="gather", train_capacity_factor=1.0, eval_capacity_factor=1.0, group_size=4)
  cfg = _cfg(moe, sparse_every=1)
  tokens = _tokens()
  model = build(cfg, seed=3)
  dropping_BLV, aux = _full_forward(*nnx.split(model), tokens)
  assert float(jnp.max(aux.stats.dropped_fraction)) > 0  # C = 1 of 4 tokens per group drops some.
  # The same parameters (the initialisation does not depend on routing), routed dropless per sequence.
  dropless_cfg = dataclasses.replace(
      cfg, moe=dataclasses.replace(moe, eval_capacity_factor=None, group_size=None)
  )
  dropless_BLV, _ = _full_forward(*nnx.split(build(dropless_cfg, seed=3)), tokens)
  decoded_BLV = _decode_logits(model, tokens)
  np.testing.assert_allclose(decoded_BLV, dropless_BLV, atol=1e-5, rtol=1e-5)
  assert np.abs(decoded_BLV - np.asarray(dropping_BLV)).max() > 1e-3


def test_decoding_config():
  dense = _cfg()
  assert decode.decoding_config(dense) is dense
  top2 = _cfg(_moe(top_k=2, eval_capacity_factor=2.0, group_size=8, allow_noncausal_routing=True))
  moe = decode.decoding_config(top2).moe
  assert (moe.eval_capacity_factor, moe.group_size) == (None, None)
  assert moe.train_capacity_factor == top2.moe.train_capacity_factor
  experts_choose = _cfg(_moe(router="experts_choose", allow_noncausal_routing=True))
  with pytest.raises(ValueError, match="model.moe.router='experts_choose' cannot decode"):
    decode.decoding_config(experts_choose)
