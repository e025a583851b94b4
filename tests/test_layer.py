"""The MoE layer against a per-token reference, its invariants, losses, gradients and config errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import dispatch, routing
from moe.config import Activation, Dispatch, MoEConfig, Priority, Router, capacity
from moe.ffn import MLP
from moe.layer import MoEFeedForward
from moe_reference import layer_params, reference_moe

D, F = 8, 16


def make_layer(**kw) -> MoEFeedForward:
  cfg = MoEConfig(**{"num_experts": 4, "expert_hidden": F, "min_capacity": 0, **kw})
  with nnx.use_eager_sharding(False):
    layer = MoEFeedForward(cfg, D, rngs=nnx.Rngs(0))
  # A router scaled up from its small init, so that routing is uneven (drops happen), but not so far
  # that float32 top-1 probabilities saturate at 1.0 and tie (batch-prioritised order would be ambiguous).
  layer.router.w[...] = layer.router.w[...] * 5.0
  return layer


def tokens(b=2, l=16, seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (b, l, D), dtype)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("cf", [0.5, 1.0, None])
@pytest.mark.parametrize("priority", ["index", "batch_prioritized"])
def test_capacity_dispatch_matches_reference(dispatch_kind, top_k, cf, priority):
  layer = make_layer(dispatch=dispatch_kind, top_k=top_k, train_capacity_factor=cf,
                     eval_capacity_factor=cf, priority=priority)
  x = tokens()
  y, aux = layer(x)
  y_ref, kept_ref = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, y_ref) < 1e-5
  np.testing.assert_allclose(aux.stats.dropped_fraction, 1 - kept_ref.mean(axis=(0, 1)), atol=1e-6)
  if cf == 0.5:
    assert not kept_ref.all(), "the test must exercise drops"
  if cf is None:
    assert kept_ref.all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_matches_reference(top_k):
  layer = make_layer(dispatch="dropless", top_k=top_k, train_capacity_factor=None,
                     eval_capacity_factor=None)
  x = tokens()
  y, aux = layer(x)
  y_ref, _ = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, y_ref) < 1e-5
  np.testing.assert_array_equal(aux.stats.dropped_fraction, np.zeros(top_k))


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather", "dropless"])
def test_swiglu_renormalized_fixed_groups_match_reference(dispatch_kind):
  cf = None if dispatch_kind == "dropless" else 0.75
  layer = make_layer(dispatch=dispatch_kind, top_k=2, activation="swiglu", renormalize_gates=True,
                     group_size=8, train_capacity_factor=cf, eval_capacity_factor=cf)
  x = tokens(b=3, l=8)
  y, _ = layer(x)
  y_ref, _ = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, y_ref) < 1e-5


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather"])
@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_experts_choose_matches_reference(dispatch_kind, cf):
  layer = make_layer(router="experts_choose", dispatch=dispatch_kind, top_k=2,
                     train_capacity_factor=cf, eval_capacity_factor=cf)
  x = tokens()
  y, aux = layer(x)
  y_ref, covered = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, y_ref) < 1e-5
  np.testing.assert_allclose(aux.stats.dropped_fraction, 1 - covered.mean(axis=(0, 1)), atol=1e-6)


def _random_routing(seed, g=3, s=32, e=4, k=2):
  key_p, key_x = jax.random.split(jax.random.key(seed))
  logits = 3.0 * jax.random.normal(key_p, (g, s, e))
  probs = jax.nn.softmax(logits)
  top = routing.tokens_choose(probs, k, renormalize=False)
  x = jax.random.normal(key_x, (g, s, D))
  return probs, top, x


def _linear_experts(e):
  w = jax.random.normal(jax.random.key(7), (e, D, D))
  return lambda x_GECD: jnp.einsum("gecd,edf->gecf", x_GECD, w)


@pytest.mark.parametrize("cf", [0.25, 0.5, 0.75, 1.0, 1.25, 2.0, None])
@pytest.mark.parametrize("priority", list(Priority))
def test_einsum_and_gather_agree_and_respect_capacity(cf, priority):
  e, k, s = 4, 2, 32
  probs, top, x = _random_routing(seed=3, s=s, e=e, k=k)
  c = capacity(s, e, k, cf, min_capacity=1)
  order = routing.priority_order(probs, priority)
  experts = _linear_experts(e)
  y_e, kept_e = dispatch.einsum_moe(x, top.expert_index, top.gates, order, c, e, experts)
  y_g, kept_g = dispatch.gather_moe(x, top.expert_index, top.gates, order, c, e, experts)
  np.testing.assert_array_equal(kept_e, kept_g)
  assert rel_err(y_g, y_e) < 1e-5
  # No expert ever receives more than C tokens in a group.
  per_expert = np.zeros((x.shape[0], e), int)
  np.add.at(per_expert, (np.arange(x.shape[0])[:, None, None].repeat(s, 1).repeat(k, 2),
                         np.asarray(top.expert_index)), np.asarray(kept_e).astype(int))
  assert per_expert.max() <= c
  if cf is None:  # C = S: nothing drops, and the dropless path computes the same function.
    assert np.asarray(kept_e).all()
    grouped = lambda x_TD, sizes: jnp.concatenate(
        [x_TD[i:i + 1] @ _expert_weight(e)[j] for j, i in _rows_by_group(sizes)])
    y_d, _ = dispatch.dropless_moe(x, top.expert_index, top.gates, grouped, e)
    assert rel_err(y_d, y_e) < 1e-5


def _expert_weight(e):
  return jax.random.normal(jax.random.key(7), (e, D, D))


def _rows_by_group(sizes):
  """(expert, row) for each row of an expert-sorted matrix with the given group sizes."""
  start = 0
  for j, n in enumerate(np.asarray(sizes)):
    for i in range(start, start + int(n)):
      yield j, i
    start += int(n)


def test_dropped_tokens_get_zero():
  layer = make_layer(dispatch="gather", top_k=1, train_capacity_factor=0.25,
                     eval_capacity_factor=0.25)
  # Every token prefers expert 2 (a positive feature 0 votes for it): only the first C tokens of each
  # sequence keep a slot, and every other token gets exactly zero.
  layer.router.w[...] = jnp.zeros((D, 4)).at[0, 2].set(5.0)
  x = tokens()
  x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)
  y, aux = layer(x)
  c = capacity(16, 4, 1, 0.25, 0)
  assert c == 1
  np.testing.assert_array_equal(np.asarray(y[:, c:]), 0.0)
  assert np.all(np.abs(np.asarray(y[:, :c])) > 0)
  np.testing.assert_allclose(aux.stats.dropped_fraction, [1 - c / 16])


def test_one_expert_equals_dense_mlp():
  for activation in Activation:
    layer = make_layer(num_experts=1, top_k=1, train_capacity_factor=None, eval_capacity_factor=None,
                       activation=activation, dispatch="gather")
    with nnx.use_eager_sharding(False):
      mlp = MLP(D, F, activation, rngs=nnx.Rngs(5))
    for name in ("w_in", "w_out", "w_gate"):
      if hasattr(mlp, name):
        getattr(layer.experts, name)[...] = getattr(mlp, name)[...][None]
    x = tokens()
    y, _ = layer(x)
    assert rel_err(y, mlp(x)) < 1e-6


def _routing_with_favourites(favourites_SK, e):
  """Probabilities whose top-k are exactly the given experts, with probability ~1 on the first."""
  s, k = favourites_SK.shape
  logits = np.zeros((1, s, e), np.float32)
  for rank in range(k):
    logits[0, np.arange(s), favourites_SK[:, rank]] = 40.0 - 10.0 * rank
  return jnp.asarray(logits)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_one_when_balanced_for_any_k(k):
  e, s = 4, 16
  favourites = np.stack([(np.arange(s) + r) % e for r in range(k)], axis=1)
  probs = jax.nn.softmax(_routing_with_favourites(favourites, e))
  top = routing.tokens_choose(probs, k, renormalize=False)
  loss = routing.load_balancing_loss(probs, routing.expert_load(top.expert_index, e))
  np.testing.assert_allclose(loss, 1.0, atol=1e-6)


def test_balance_loss_is_num_experts_when_collapsed():
  e, s = 4, 16
  probs = jax.nn.softmax(_routing_with_favourites(np.zeros((s, 1), int), e))
  top = routing.tokens_choose(probs, 1, renormalize=False)
  loss = routing.load_balancing_loss(probs, routing.expert_load(top.expert_index, e))
  np.testing.assert_allclose(loss, e, atol=1e-5)


def test_balance_loss_formula_and_gradient():
  """E * sum_e f_e P_e with f from the top-k choices and P the mean probability; only P has a gradient."""
  logits = jax.random.normal(jax.random.key(3), (2, 6, 4)) * 2
  probs = jax.nn.softmax(logits)
  top = routing.tokens_choose(probs, 2, renormalize=False)
  p, idx = np.asarray(probs, np.float64), np.asarray(top.expert_index)
  expected = []
  for g in range(2):
    f = np.zeros(4)
    for s_ in range(6):
      for e in idx[g, s_]:
        f[e] += 1 / (6 * 2)
    expected.append(4 * np.sum(f * p[g].mean(0)))
  load = routing.expert_load(top.expert_index, 4)
  np.testing.assert_allclose(routing.load_balancing_loss(probs, load), np.mean(expected), rtol=1e-6)
  grad_load = jax.grad(lambda l: routing.load_balancing_loss(probs, l))(load)
  np.testing.assert_array_equal(grad_load, 0.0)
  grad_probs = jax.grad(lambda q: routing.load_balancing_loss(q, load))(probs)
  # d loss / d p[g, s, e] = E * f[g, e] / (S * G): the same for every token of a group.
  np.testing.assert_allclose(grad_probs, 4 * np.asarray(load)[:, None, :] / (6 * 2) * np.ones((2, 6, 4)),
                             rtol=1e-6)


def test_z_loss_formula():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3)), np.float64) * 4
  lse = np.log(np.sum(np.exp(logits), axis=-1))
  np.testing.assert_allclose(routing.router_z_loss(jnp.asarray(logits, jnp.float32)),
                             np.mean(lse**2), rtol=1e-6)
  np.testing.assert_allclose(routing.router_z_loss(jnp.zeros((1, 3, 8))), math.log(8)**2, rtol=1e-6)


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather", "dropless"])
def test_gradients_reach_router_and_used_experts_and_jit_agrees(dispatch_kind):
  cf = None if dispatch_kind == "dropless" else 1.0
  layer = make_layer(dispatch=dispatch_kind, top_k=2, train_capacity_factor=cf,
                     eval_capacity_factor=cf)
  x = tokens()

  def loss_fn(layer, x):
    y, aux = layer(x, train=True)
    return jnp.sum(y**2) + aux.losses.balance + aux.losses.z

  grads = nnx.grad(loss_fn)(layer, x)
  jit_grads = nnx.jit(nnx.grad(loss_fn))(layer, x)
  assert np.any(np.asarray(grads.router.w[...]) != 0)
  _, kept = reference_moe(x, layer_params(layer), layer.cfg, train=True)
  top = routing.tokens_choose(jax.nn.softmax(layer.router(x.reshape(2, 16, D))), 2, False)
  used = np.unique(np.asarray(top.expert_index)[kept])
  w_in_grad = np.asarray(grads.experts.w_in[...])
  for e in range(4):
    assert np.any(w_in_grad[e] != 0) == (e in used), f"expert {e}"
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jit_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  y, _ = layer(x)
  y_jit, _ = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(y, y_jit, rtol=1e-5, atol=1e-6)


def test_bfloat16_activations_keep_float32_router_logits():
  layer = make_layer(dtype="bfloat16", dispatch="gather")
  x = tokens(dtype=jnp.bfloat16)
  assert layer.router(x.reshape(2, 16, D)).dtype == jnp.float32
  y, aux = layer(x)
  assert y.dtype == jnp.bfloat16
  assert aux.losses.z.dtype == jnp.float32
  assert layer.experts.w_in[...].dtype == jnp.float32


def test_jitter_only_in_training():
  layer = make_layer(jitter_eps=0.1)
  x = tokens().reshape(2, 16, D)
  np.testing.assert_array_equal(layer.router(x), layer.router(x, train=False, rng=jax.random.key(0)))
  noisy = layer.router(x, train=True, rng=jax.random.key(0))
  assert not np.allclose(noisy, layer.router(x))
  with pytest.raises(ValueError, match="jitter"):
    layer.router(x, train=True)


def test_train_and_eval_capacity_differ():
  layer = make_layer(train_capacity_factor=0.5, eval_capacity_factor=4.0)
  _, aux_train = layer(tokens(), train=True)
  _, aux_eval = layer(tokens(), train=False)
  assert float(aux_train.stats.dropped_fraction[0]) > 0
  assert float(aux_eval.stats.dropped_fraction[0]) == 0


def test_stats():
  layer = make_layer(top_k=2, train_capacity_factor=1.0, eval_capacity_factor=1.0)
  x = tokens()
  _, aux = layer(x)
  s = aux.stats
  np.testing.assert_allclose(np.sum(s.expert_load), 1.0, rtol=1e-6)
  _, kept = reference_moe(x, layer_params(layer), layer.cfg)
  c = capacity(16, 4, 2, 1.0, 0)
  np.testing.assert_allclose(s.capacity_used, kept.sum(axis=(1, 2)).mean() / (4 * c), rtol=1e-6)
  assert 0 < float(s.router_entropy) < math.log(4)
  assert 0.25 < float(s.top1_probability) <= 1.0


def test_capacity_formula():
  assert capacity(64, 8, 1, 1.0) == 8
  assert capacity(64, 8, 2, 1.25) == 20  # ceil(1.25 * 2 * 64 / 8)
  assert capacity(10, 3, 1, 1.0, min_capacity=0) == 4  # ceil(10 / 3)
  assert capacity(64, 8, 1, 0.01, min_capacity=4) == 4
  assert capacity(16, 2, 2, 4.0) == 16  # Clamped to S.
  assert capacity(16, 4, 2, None) == 16 and capacity(16, 4, 2, 0.0) == 16
  assert capacity(5, 1, 1, 1.2, min_capacity=0) == 5  # 1.2 * 5 = 6.000000000000001 in floats.


@pytest.mark.parametrize("kwargs, field", [
    ({"num_experts": 4, "top_k": 5}, "moe.top_k"),
    ({"num_experts": 4, "top_k": 0}, "moe.top_k"),
    ({"num_experts": 0}, "moe.num_experts"),
    ({"num_experts": 4, "min_capacity": -1}, "moe.min_capacity"),
    ({"num_experts": 4, "router": "experts_choose", "dispatch": "dropless",
      "train_capacity_factor": None, "eval_capacity_factor": None}, "moe.dispatch"),
    ({"num_experts": 4, "dispatch": "dropless"}, "moe.train_capacity_factor"),
    ({"num_experts": 4, "dispatch": "scatter"}, "moe.dispatch"),
    ({"num_experts": 4, "router": "random"}, "moe.router"),
    ({"num_experts": 4, "priority": "fifo"}, "moe.priority"),
    ({"num_experts": 4, "activation": "relu6"}, "moe.activation"),
    ({"num_experts": 4, "dtype": "float16"}, "moe.dtype"),
    ({"num_experts": 4, "group_size": 0}, "moe.group_size"),
])
def test_bad_config_raises_named_error(kwargs, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")) as info:
    MoEConfig(expert_hidden=8, **kwargs)
  if "dispatch" in kwargs and kwargs["dispatch"] == "scatter":
    assert "'einsum'" in str(info.value) and "'dropless'" in str(info.value)


def test_group_size_must_divide_tokens_before_tracing():
  layer = make_layer(group_size=5)
  with pytest.raises(ValueError, match=r"moe\.group_size=5"):
    layer(tokens())  # 2 x 16 tokens.
  enum_values = {m.value for m in Dispatch} | {m.value for m in Router}
  assert {"einsum", "gather", "dropless", "tokens_choose", "experts_choose"} == enum_values


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather"])
def test_routing_decisions_match_the_reference(dispatch_kind):
  layer = make_layer(dispatch=dispatch_kind, top_k=2, train_capacity_factor=0.75,
                     eval_capacity_factor=0.75, priority="batch_prioritized")
  x = tokens()
  expert_index, kept = layer.routing_decisions(x)
  _, kept_ref = reference_moe(x, layer_params(layer), layer.cfg)
  np.testing.assert_array_equal(kept, kept_ref)
  assert not kept_ref.all()
