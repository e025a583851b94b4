"""The decoder: layout, scan plan, causality, dense == sparse with one expert, scan == unrolled."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config import ModelConfig, MoEConfig, sparse_layer_mask
from moe.model import build, scan_plan

V, L = 40, 12


def cfg_(**kw) -> ModelConfig:
  base = dict(vocab_size=V, d_model=16, num_layers=4, num_heads=4, num_kv_heads=2, mlp_hidden=24,
              max_len=L, moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=24,
                                       train_capacity_factor=1.0, eval_capacity_factor=1.0,
                                       min_capacity=1),
              sparse_every=2)
  base.update(kw)
  return ModelConfig(**base)


def toks(b=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, L), 0, V)


def test_sparse_layer_mask():
  assert sparse_layer_mask(6, sparse_every=2) == (False, True) * 3  # Switch: every other layer.
  assert sparse_layer_mask(4, sparse_every=1, first_dense=1) == (False, True, True, True)
  assert sparse_layer_mask(5, sparse_every=2, first_dense=1) == (False, False, True, False, True)
  assert sparse_layer_mask(4, sparse_layers=(0, 3)) == (True, False, False, True)
  with pytest.raises(ValueError, match="model.sparse_layers"):
    sparse_layer_mask(4, sparse_layers=(4,))
  with pytest.raises(ValueError, match="model.sparse_every"):
    sparse_layer_mask(4, sparse_every=0)


def test_scan_plan():
  assert scan_plan((False, True) * 3) == (0, 2)
  assert scan_plan((False,) * 5) == (0, 1)
  assert scan_plan((False, True, True, True)) == (1, 1)
  assert scan_plan((True, False, False, True)) == (0, 4)
  assert scan_plan((False, False, True, False, True)) == (1, 2)
  assert scan_plan((False, True), scan_layers=False) == (2, 0)
  for mask in [(False, True) * 3, (False, True, True, True), (True, False, True, True, False)]:
    prefix, period = scan_plan(mask)
    rest = mask[prefix:]
    assert rest == rest[:period] * (len(rest) // period)


@pytest.mark.parametrize("kind", ["dense", "switch", "dropless_top2"])
def test_causal(kind):
  """Changing a future token never changes an earlier logit. (Top-k routing with a capacity is not
  causal for k > 1 or batch-prioritised order: a later token's first choice can take the slot of an
  earlier token's second choice. Top-1 in sequence order and dropless routing are.)"""
  if kind == "dense":
    cfg = cfg_(moe=None)
  elif kind == "switch":
    cfg = cfg_()
  else:
    cfg = cfg_(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=24, dispatch="dropless",
                             train_capacity_factor=None, eval_capacity_factor=None))
  model = build(cfg)
  x = toks()
  logits, _ = model(x)
  for t in (3, 7, L - 1):
    changed = x.at[:, t].set((x[:, t] + 1) % V)
    new_logits, _ = model(changed)
    np.testing.assert_array_equal(new_logits[:, :t], logits[:, :t])
    assert not np.allclose(new_logits[:, t], logits[:, t])


def _copy(dst, src):
  for (_, d), (_, s) in zip(nnx.to_flat_state(nnx.state(dst, nnx.Param)),
                            nnx.to_flat_state(nnx.state(src, nnx.Param))):
    d.set_value(jnp.asarray(s.get_value()).reshape(d.get_value().shape))


def test_dense_equals_sparse_with_one_expert():
  dense_cfg = cfg_(moe=None, sparse_every=1)
  sparse_cfg = cfg_(sparse_every=1, moe=MoEConfig(num_experts=1, top_k=1, expert_hidden=24,
                                                  train_capacity_factor=None,
                                                  eval_capacity_factor=None))
  dense, sparse = build(dense_cfg, seed=1), build(sparse_cfg, seed=2)
  # Same embeddings, attention and norms; each expert bank of one gets its layer's dense MLP weights.
  ffn_s = sparse.periods.layers[0].ffn
  ffn_d = dense.periods.layers[0].ffn
  sparse.embed[...] = dense.embed[...]
  for name in ("attention_norm", "ffn_norm"):
    getattr(sparse.periods.layers[0], name).scale[...] = getattr(dense.periods.layers[0], name).scale[...]
  for name in ("q", "k", "v", "o"):
    getattr(sparse.periods.layers[0].attention, name)[...] = getattr(
        dense.periods.layers[0].attention, name)[...]
  sparse.final_norm.scale[...] = dense.final_norm.scale[...]
  ffn_s.experts.w_in[...] = ffn_d.w_in[...][:, None]
  ffn_s.experts.w_out[...] = ffn_d.w_out[...][:, None]
  x = toks()
  logits_d, aux_d = dense(x)
  logits_s, aux_s = sparse(x, train=True)
  assert aux_d is None and aux_s.losses.balance.shape == (4,)
  np.testing.assert_allclose(logits_s, logits_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_unrolled(remat):
  # Router jitter on: each layer must draw the same noise (fold_in of its index) in both layouts.
  jitter = MoEConfig(num_experts=4, top_k=1, expert_hidden=24, train_capacity_factor=1.0,
                     eval_capacity_factor=1.0, min_capacity=1, jitter_eps=0.3)
  scanned = build(cfg_(remat=remat, moe=jitter))
  unrolled = build(cfg_(scan_layers=False, moe=jitter), seed=3)
  assert scanned.repeats == 2 and unrolled.repeats == 0
  unrolled.embed[...] = scanned.embed[...]
  unrolled.final_norm.scale[...] = scanned.final_norm.scale[...]
  for i, block in enumerate(unrolled.prefix):  # Layer i = repetition i // 2, position i % 2.
    stacked = nnx.state(scanned.periods.layers[i % 2], nnx.Param)
    one = jax.tree.map(lambda a: a[i // 2], stacked)
    nnx.update(block, one)
  x = toks()
  key = jax.random.key(4)
  (logits_s, aux_s), (logits_u, aux_u) = scanned(x, train=True, rng=key), unrolled(x, train=True,
                                                                                  rng=key)
  np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux_s.losses.z, aux_u.losses.z, rtol=1e-5)
  grad = lambda m: nnx.grad(lambda m: m(x, train=True, rng=key)[0].mean())(m)
  np.testing.assert_allclose(grad(scanned).embed[...], grad(unrolled).embed[...], rtol=1e-4,
                             atol=1e-7)


def test_grouped_query_attention_equals_repeated_heads():
  gqa = build(cfg_(moe=None, num_kv_heads=2))
  mha = build(cfg_(moe=None, num_kv_heads=4), seed=5)
  state = nnx.state(gqa, nnx.Param)
  repeat = lambda a: jnp.repeat(a, 2, axis=2)  # [layers, d, kv, head_dim]: kv head j serves 2 heads.
  state["periods"]["layers"][0]["attention"]["k"].set_value(
      repeat(state["periods"]["layers"][0]["attention"]["k"].get_value()))
  state["periods"]["layers"][0]["attention"]["v"].set_value(
      repeat(state["periods"]["layers"][0]["attention"]["v"].get_value()))
  nnx.update(mha, state)
  x = toks()
  np.testing.assert_allclose(mha(x)[0], gqa(x)[0], rtol=1e-5, atol=1e-5)


def test_aux_is_stacked_over_sparse_layers_in_order():
  cfg = cfg_(num_layers=5, sparse_every=2, first_dense=1)  # Sparse layers 2 and 4.
  assert cfg.sparse_mask == (False, False, True, False, True)
  model = build(cfg)
  _, aux = model(toks())
  assert aux.stats.expert_load.shape == (2, 4)
  assert aux.stats.dropped_fraction.shape == (2, 1)


def test_untied_embeddings_and_bfloat16():
  model = build(cfg_(tie_embeddings=False, dtype="bfloat16"))
  logits, aux = model(toks())
  assert logits.dtype == jnp.float32 and model.unembed[...].dtype == jnp.float32
  assert model.cfg.moe.dtype == "bfloat16"


def test_experts_choose_needs_acknowledgement():
  ec = MoEConfig(num_experts=4, top_k=1, expert_hidden=8, router="experts_choose")
  with pytest.raises(ValueError, match="allow_noncausal_routing"):
    cfg_(moe=ec)
  cfg_(moe=dataclasses.replace(ec, allow_noncausal_routing=True))


@pytest.mark.parametrize("kw, field", [
    ({"num_heads": 3}, "model.num_heads"),
    ({"num_kv_heads": 3}, "model.num_kv_heads"),
    ({"remat": "sometimes"}, "model.remat"),
    ({"dtype": "int8"}, "model.dtype"),
    ({"activation": "tanh"}, "model.activation"),
    ({"first_dense": 9}, "model.first_dense"),
])
def test_model_config_errors(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    cfg_(**kw)
