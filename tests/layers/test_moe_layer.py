"""MoEFeedForward as a whole against the per-token reference (tests/moe_reference.py): outputs,
auxiliary losses and their gradients, statistics, invariants and config errors.

Function-level tests live beside their modules: tests/layers/test_routing.py, tests/layers/test_dispatch.py,
tests/layers/test_ffn.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_reference as ref
from moe.config.enums import Activation
from moe.config.layer import MoEConfig
from moe.layers.ffn import MLP
from moe.layers import balancing, moe_layer
from moe.layers.moe_layer import MoEFeedForward
from moe_reference import layer_params, reference_moe

D, F = 8, 16


def make_layer(**kw) -> MoEFeedForward:
  cfg = MoEConfig(**{"num_experts": 4, "expert_hidden": F, "min_capacity": 0, **kw})
  with nnx.use_eager_sharding(False):
    layer = MoEFeedForward(cfg, D, rngs=nnx.Rngs(0))
  # A router scaled up from its small init, so that routing is uneven (drops happen), but not so far
  # that float32 top-1 probabilities saturate at 1.0 and tie (batch-prioritised order would be
  # ambiguous).
  layer.router.w[...] = layer.router.w[...] * 5.0
  return layer


def tokens(b=2, l=16, seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (b, l, D), dtype)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def assert_aux_matches(aux, r: ref.Reference):
  """Losses and every routing statistic of the layer equal the reference's."""
  np.testing.assert_allclose(aux.losses.balance, r.balance, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aux.losses.z, r.z, rtol=1e-5)
  np.testing.assert_allclose(aux.stats.dropped_fraction, r.stats.dropped_fraction, atol=1e-6)
  np.testing.assert_allclose(aux.stats.expert_load, r.stats.expert_load, atol=1e-6)
  np.testing.assert_allclose(aux.stats.router_entropy, r.stats.router_entropy, rtol=1e-5)
  np.testing.assert_allclose(aux.stats.top1_probability, r.stats.top1_probability, rtol=1e-5)
  np.testing.assert_allclose(aux.stats.capacity_used, r.stats.capacity_used, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# The layer against the reference.


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("cf", [0.5, 1.0, None])
@pytest.mark.parametrize("priority", ["index", "batch_prioritized"])
def test_capacity_dispatch_matches_reference(dispatch_kind, top_k, cf, priority):
  layer = make_layer(
      dispatch=dispatch_kind,
      top_k=top_k,
      train_capacity_factor=cf,
      eval_capacity_factor=cf,
      priority=priority,
  )
  x = tokens()
  y, aux = layer(x)
  r = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, r.y) < 1e-5
  assert_aux_matches(aux, r)
  if cf == 0.5:
    assert not r.kept.all(), "the test must exercise drops"
  if cf is None:
    assert r.kept.all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_matches_reference(top_k):
  layer = make_layer(
      dispatch="dropless", top_k=top_k, train_capacity_factor=None, eval_capacity_factor=None
  )
  x = tokens()
  y, aux = layer(x)
  r = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, r.y) < 1e-5
  np.testing.assert_array_equal(aux.stats.dropped_fraction, np.zeros(top_k))
  assert_aux_matches(aux, r)


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather", "dropless"])
def test_swiglu_renormalized_fixed_groups_match_reference(dispatch_kind):
  cf = None if dispatch_kind == "dropless" else 0.75
  layer = make_layer(
      dispatch=dispatch_kind,
      top_k=2,
      activation="swiglu",
      renormalize_gates=True,
      group_size=8,
      train_capacity_factor=cf,
      eval_capacity_factor=cf,
  )
  x = tokens(b=3, l=8)
  y, aux = layer(x)
  r = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, r.y) < 1e-5
  assert_aux_matches(aux, r)


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather"])
@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_experts_choose_matches_reference(dispatch_kind, cf):
  layer = make_layer(
      router="experts_choose",
      dispatch=dispatch_kind,
      top_k=2,
      train_capacity_factor=cf,
      eval_capacity_factor=cf,
  )
  x = tokens()
  y, aux = layer(x)
  r = reference_moe(x, layer_params(layer), layer.cfg)
  assert rel_err(y, r.y) < 1e-5
  assert_aux_matches(aux, r)


def test_dropped_tokens_get_zero():
  layer = make_layer(
      dispatch="gather", top_k=1, train_capacity_factor=0.25, eval_capacity_factor=0.25
  )
  # Every token prefers expert 2 (a positive feature 0 votes for it): only the first C tokens of
  # each sequence keep a slot, and every other token gets exactly zero.
  layer.router.w[...] = jnp.zeros((D, 4)).at[0, 2].set(5.0)
  x = tokens()
  x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)
  y, aux = layer(x)
  c = 1  # ceil(0.25 * 1 * 16 / 4).
  np.testing.assert_array_equal(np.asarray(y[:, c:]), 0.0)
  assert np.all(np.abs(np.asarray(y[:, :c])) > 0)
  np.testing.assert_allclose(aux.stats.dropped_fraction, [1 - c / 16])


def test_one_expert_equals_dense_mlp():
  for activation in Activation:
    layer = make_layer(
        num_experts=1,
        top_k=1,
        train_capacity_factor=None,
        eval_capacity_factor=None,
        activation=activation,
        dispatch="gather",
    )
    with nnx.use_eager_sharding(False):
      mlp = MLP(D, F, activation, rngs=nnx.Rngs(5))
    for name in ("w_in", "w_out", "w_gate"):
      if hasattr(mlp, name):
        getattr(layer.experts, name)[...] = getattr(mlp, name)[...][None]
    x = tokens()
    y, _ = layer(x)
    assert rel_err(y, mlp(x)) < 1e-6


# --------------------------------------------------------------------------------------------------
# Auxiliary losses: the layer hands the right tensors to them.


def _balance_for_cut(x, w_router, s, k):
  """Reference balance loss with the tokens cut into groups of s: logits in float64 from the
  layer's router weight, f before capacity, P the group's mean probability."""
  x_GSD = ref.cut_groups(x, s)
  probs = ref.softmax(x_GSD @ w_router)
  choices = np.stack([ref.top_k_choices(p, k) for p in probs])
  return ref.balance_loss(probs, choices)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("group_size", [None, 8, 32])
def test_losses_match_reference(top_k, group_size):
  """aux.losses = (mean over groups of E * sum_e f_e P_e, mean over tokens of logsumexp^2).

  Batch 2 x length 16: groups are the sequences (None), half sequences (8) or the whole batch (32).
  The balance loss is not linear in the cut, so it tells the three apart; capacity 0.5 drops claims,
  so it also tells f before capacity (the definition) from f after.
  """
  layer = make_layer(
      dispatch="gather", top_k=top_k, train_capacity_factor=0.5, group_size=group_size
  )
  x = tokens(b=2, l=16)
  _, aux = layer(x, train=True)
  w = np.asarray(layer.router.w[...], np.float64)
  by_cut = {s: _balance_for_cut(x, w, s, top_k) for s in (16, 8, 32)}
  s = 16 if group_size is None else group_size
  others = [v for cut, v in by_cut.items() if cut != s]
  assert min(abs(by_cut[s] - v) for v in others) > 1e-3 * by_cut[s], "the cut must matter here"
  assert not reference_moe(x, layer_params(layer), layer.cfg, train=True).kept.all()

  logits = ref.cut_groups(x, s) @ w
  np.testing.assert_allclose(aux.losses.balance, by_cut[s], rtol=1e-5)
  np.testing.assert_allclose(aux.losses.z, np.mean(ref.logsumexp(logits) ** 2), rtol=1e-5)
  assert aux.losses.balance.shape == () and aux.losses.balance.dtype == jnp.float32


def _loss_gradients(layer, x):
  """d balance / d router weight and d z / d router weight, by JAX through the whole layer."""
  grads = [
      nnx.grad(lambda m, name=name: getattr(m(x, train=True)[1].losses, name))(layer)
      for name in ("balance", "z")
  ]
  return [np.asarray(g.router.w[...], np.float64) for g in grads]


def _reference_loss_gradients(x, w, s, k, balance: bool):
  """Hand-derived gradients w.r.t. the router weight W (logits z = x W, p = softmax(z)):

  balance = (1/G) sum_g E sum_e f_ge P_ge with f constant:
    d/dz_gsj = p_gsj (a_gj - sum_e a_ge p_gse),   a_ge = E f_ge / (G S)
  z-loss = (1/(G S)) sum_gs lse_gs^2:   d/dz_gsj = 2 lse_gs p_gsj / (G S)
  d/dW = sum_gs x_gs^T d/dz_gs.
  """
  x_GSD = ref.cut_groups(x, s)
  logits = x_GSD @ w
  p = ref.softmax(logits)
  g, _, e = p.shape
  if balance:
    f = ref.assignment_fraction(np.stack([ref.top_k_choices(q, k) for q in p]), e)
    a = e * f[:, None, :] / (g * s)
    dz = p * (a - np.sum(a * p, axis=-1, keepdims=True))
  else:
    dz = 2.0 * ref.logsumexp(logits)[..., None] * p / (g * s)
  return np.einsum("gsd,gse->de", x_GSD, dz)


@pytest.mark.parametrize("router", ["tokens_choose", "experts_choose"])
def test_loss_gradients_wrt_router_match_reference(router):
  """Tokens choose: the balance loss reaches the router through P only. Experts choose: balance
  is a 0.0 float32 scalar with zero gradient (every expert is full by construction; flaxformer),
  while the z-loss still trains the router."""
  layer = make_layer(router=router, dispatch="einsum", top_k=2, train_capacity_factor=0.75)
  x = tokens()
  _, aux = layer(x, train=True)
  w = np.asarray(layer.router.w[...], np.float64)
  grad_balance, grad_z = _loss_gradients(layer, x)
  r = reference_moe(x, layer_params(layer), layer.cfg, train=True)
  assert aux.losses.balance.shape == () and aux.losses.balance.dtype == jnp.float32
  if router == "experts_choose":
    assert r.balance == 0.0
    np.testing.assert_array_equal(aux.losses.balance, 0.0)
    np.testing.assert_array_equal(grad_balance, 0.0)
  else:
    np.testing.assert_allclose(aux.losses.balance, r.balance, rtol=1e-5)
    expected = _reference_loss_gradients(x, w, 16, 2, balance=True)
    assert np.max(np.abs(expected)) > 1e-3
    np.testing.assert_allclose(grad_balance, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(aux.losses.z, r.z, rtol=1e-5)
  np.testing.assert_allclose(
      grad_z, _reference_loss_gradients(x, w, 16, 2, balance=False), rtol=1e-4, atol=1e-6
  )


# --------------------------------------------------------------------------------------------------
# Statistics.


@pytest.mark.parametrize(
    "kw, expected_used",
    [
        ({"dispatch": "einsum", "train_capacity_factor": 1.0}, None),  # Drops, and empty slots too.
        ({"dispatch": "einsum", "train_capacity_factor": None}, 2 / 4),  # C = S: k / E.
        ({"dispatch": "gather", "train_capacity_factor": None}, 2 / 4),
        (
            {"dispatch": "dropless", "train_capacity_factor": None, "eval_capacity_factor": None},
            1.0,
        ),
        ({"router": "experts_choose", "dispatch": "gather", "train_capacity_factor": 0.5}, 1.0),
    ],
    ids=["einsum-drops", "einsum-no-cf", "gather-no-cf", "dropless", "experts-choose"],
)
def test_capacity_used_is_kept_over_computed_slots(kw, expected_used):
  """capacity_used = kept assignments / expert slots computed: E * C for the buffer paths (k / E
  when C = S), exactly the assignments for DROPLESS, every slot filled for experts choose."""
  layer = make_layer(top_k=2, **kw)
  x = tokens()
  _, aux = layer(x, train=True)
  r = reference_moe(x, layer_params(layer), layer.cfg, train=True)
  if expected_used is None:
    assert r.stats.capacity_used < 0.99 and r.stats.dropped_fraction.max() > 0
  else:
    np.testing.assert_allclose(r.stats.capacity_used, expected_used)
  np.testing.assert_allclose(aux.stats.capacity_used, r.stats.capacity_used, rtol=1e-6)
  assert_aux_matches(aux, r)


def test_train_and_eval_capacity_differ():
  layer = make_layer(train_capacity_factor=0.5, eval_capacity_factor=4.0)
  _, aux_train = layer(tokens(), train=True)
  _, aux_eval = layer(tokens(), train=False)
  assert float(aux_train.stats.dropped_fraction[0]) > 0
  assert float(aux_eval.stats.dropped_fraction[0]) == 0


# --------------------------------------------------------------------------------------------------
# Gradients, dtypes, decisions.


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather", "dropless"])
def test_gradients_reach_router_and_used_experts_and_jit_agrees(dispatch_kind):
  cf = None if dispatch_kind == "dropless" else 1.0
  layer = make_layer(
      dispatch=dispatch_kind, top_k=2, train_capacity_factor=cf, eval_capacity_factor=cf
  )
  x = tokens()

  def loss_fn(layer, x):
    y, aux = layer(x, train=True)
    return jnp.sum(y**2) + aux.losses.balance + aux.losses.z

  grads = nnx.grad(loss_fn)(layer, x)
  jit_grads = nnx.jit(nnx.grad(loss_fn))(layer, x)
  assert np.any(np.asarray(grads.router.w[...]) != 0)
  r = reference_moe(x, layer_params(layer), layer.cfg, train=True)
  used = np.unique(r.choices[r.kept])
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


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather"])
def test_routing_decisions_match_the_reference(dispatch_kind):
  layer = make_layer(
      dispatch=dispatch_kind,
      top_k=2,
      train_capacity_factor=0.75,
      eval_capacity_factor=0.75,
      priority="batch_prioritized",
  )
  x = tokens()
  expert_index, kept = layer.routing_decisions(x)
  r = reference_moe(x, layer_params(layer), layer.cfg)
  np.testing.assert_array_equal(expert_index, r.choices)
  np.testing.assert_array_equal(kept, r.kept)
  assert not r.kept.all()


@pytest.mark.parametrize(
    "kw",
    [
        {"dispatch": "dropless", "train_capacity_factor": None, "eval_capacity_factor": None},
        {"router": "experts_choose", "dispatch": "einsum", "eval_capacity_factor": 0.5},
    ],
    ids=["dropless", "experts-choose"],
)
def test_routing_decisions_without_drops_match_the_reference(kw):
  layer = make_layer(top_k=2, **kw)
  x = tokens()
  index, kept = layer.routing_decisions(x)
  r = reference_moe(x, layer_params(layer), layer.cfg)
  np.testing.assert_array_equal(index, r.choices)  # Experts per token, or tokens per expert.
  assert np.asarray(kept).all()


# --------------------------------------------------------------------------------------------------
# Capacity and configuration.


def test_group_size_must_divide_tokens_before_tracing():
  layer = make_layer(group_size=5)
  with pytest.raises(ValueError, match=r"moe\.group_size=5"):
    layer(tokens())  # 2 x 16 tokens.


# --------------------------------------------------------------------------------------------------
# Padding (issue 11, part 1) and the serving order.

PADDED_LAYERS = {
    "einsum-top1": dict(dispatch="einsum", top_k=1),
    "gather-top2": dict(dispatch="gather", top_k=2),
    "einsum-top2-token-major": dict(dispatch="einsum", top_k=2, serving_order="token_major"),
    "gather-top2-token-major-bpr": dict(
        dispatch="gather", top_k=2, serving_order="token_major", priority="batch_prioritized"
    ),
    "dropless-top2": dict(
        dispatch="dropless", top_k=2, train_capacity_factor=None, eval_capacity_factor=None
    ),
    "experts-choose-einsum": dict(router="experts_choose", dispatch="einsum", top_k=2),
    "experts-choose-gather": dict(router="experts_choose", dispatch="gather", top_k=1),
    # C = 4 * 8 / 4 = 8 slots per expert for groups of 8 real tokens or fewer: every expert picks
    # padding, which must count neither in the load nor in capacity_used.
    "experts-choose-picks-padding": dict(
        router="experts_choose",
        dispatch="gather",
        top_k=1,
        train_capacity_factor=4.0,
        eval_capacity_factor=4.0,
    ),
}


def _padding_mask(b=2, l=16, seed=3):
  """float32 [B, L] weights, 1 real and 0 padding: trailing padding in row 0 (as an eval batch has),
  scattered padding in row 1 (as unpacked data may have)."""
  mask = np.ones((b, l), np.float32)
  mask[0, l // 2 :] = 0.0
  mask[1] = np.asarray(jax.random.uniform(jax.random.key(seed), (l,))) > 0.4
  mask[1, 0] = 0.0
  return jnp.asarray(mask)


def _padded_layer(kw):
  return make_layer(**{"train_capacity_factor": 0.25, "eval_capacity_factor": 0.25, **kw})


@pytest.mark.parametrize("kw", PADDED_LAYERS.values(), ids=PADDED_LAYERS.keys())
def test_padded_layer_matches_reference(kw):
  layer = _padded_layer(kw)
  x, mask = tokens(), _padding_mask()
  y, aux = layer(x, token_mask_BL=mask)
  r = reference_moe(x, layer_params(layer), layer.cfg, token_mask_BL=mask)
  assert rel_err(y, r.y) < 1e-5
  assert_aux_matches(aux, r)
  real = np.asarray(mask) > 0
  np.testing.assert_array_equal(np.asarray(y)[~real], 0.0)
  if layer.cfg.router.value == "experts_choose" and layer.cfg.eval_capacity_factor > 1.0:
    picked_padding = ~real.reshape(r.choices.shape[0], -1)[
        np.arange(r.choices.shape[0])[:, None, None], r.choices
    ]
    assert picked_padding.any(), "must exercise picks of padding"
    assert r.stats.capacity_used < 1.0
  if layer.cfg.train_capacity_factor is not None and layer.cfg.router.value == "tokens_choose":
    assert not r.kept.reshape(-1, layer.cfg.top_k)[real.reshape(-1)].all(), "must exercise drops"
    # The same tokens without the mask route differently: padding took slots from real tokens.
    assert not np.array_equal(reference_moe(x, layer_params(layer), layer.cfg).kept, r.kept)


@pytest.mark.parametrize("kw", PADDED_LAYERS.values(), ids=PADDED_LAYERS.keys())
def test_padded_inputs_change_nothing_for_real_tokens(kw):
  """Padded tokens replaced by other values: real outputs, losses and statistics are unchanged."""
  layer = _padded_layer(kw)
  x, mask = tokens(), _padding_mask()
  pad = (np.asarray(mask) == 0)[..., None]
  x_other = jnp.where(pad, 10.0 * tokens(seed=7), x)
  y, aux = layer(x, token_mask_BL=mask)
  y_other, aux_other = layer(x_other, token_mask_BL=mask)
  np.testing.assert_array_equal(np.asarray(y)[~pad[..., 0]], np.asarray(y_other)[~pad[..., 0]])
  np.testing.assert_array_equal(np.asarray(y_other)[pad[..., 0]], 0.0)
  np.testing.assert_allclose(aux_other.losses.z, aux.losses.z, rtol=1e-6)
  np.testing.assert_allclose(aux_other.losses.balance, aux.losses.balance, rtol=1e-6)
  for name in ("dropped_fraction", "expert_load", "router_entropy", "top1_probability"):
    np.testing.assert_allclose(getattr(aux_other.stats, name), getattr(aux.stats, name), rtol=1e-6)
  if layer.cfg.router.value == "tokens_choose":
    np.testing.assert_array_equal(
        layer.routing_decisions(x, token_mask_BL=mask)[1],
        layer.routing_decisions(x_other, token_mask_BL=mask)[1],
    )


@pytest.mark.optimized_compile  # Bit-identity of two programs: see conftest.py.
@pytest.mark.parametrize("kw", PADDED_LAYERS.values(), ids=PADDED_LAYERS.keys())
def test_all_ones_mask_is_bit_identical_to_no_mask(kw):
  """Outputs, losses, statistics and gradients: a batch without padding routes as before."""
  layer = _padded_layer(kw)
  x, ones = tokens(), jnp.ones((2, 16), jnp.float32)

  def loss(layer, x, mask):
    y, aux = layer(x, train=True, token_mask_BL=mask)
    return jnp.sum(y**2) + aux.losses.balance + aux.losses.z, (y, aux)

  grad = nnx.grad(loss, has_aux=True)
  g0, (y0, aux0) = grad(layer, x, None)
  g1, (y1, aux1) = grad(layer, x, ones)
  jax.tree.map(np.testing.assert_array_equal, (y1, aux1), (y0, aux0))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(g1), nnx.state(g0))
  decisions = layer.routing_decisions(x, token_mask_BL=ones)
  jax.tree.map(np.testing.assert_array_equal, decisions, layer.routing_decisions(x))


@pytest.mark.parametrize("dispatch_kind", ["einsum", "gather"])
def test_routing_decisions_with_padding_and_token_major_match_the_reference(dispatch_kind):
  layer = _padded_layer(dict(dispatch=dispatch_kind, top_k=2, serving_order="token_major"))
  x, mask = tokens(), _padding_mask()
  expert_index, kept = layer.routing_decisions(x, token_mask_BL=mask)
  r = reference_moe(x, layer_params(layer), layer.cfg, token_mask_BL=mask)
  np.testing.assert_array_equal(expert_index, r.choices)
  np.testing.assert_array_equal(kept, r.kept)


# --------------------------------------------------------------------------------------------------
# Recipes since 2024 (moe.layers.balancing): sigmoid scores, the selection bias, the global-batch and
# per-sequence balance losses, through every dispatch path.

RECIPE_PATHS = {
    "einsum-top2": dict(dispatch="einsum", top_k=2, train_capacity_factor=0.5),
    "gather-top2-bpr": dict(
        dispatch="gather", top_k=2, train_capacity_factor=0.5, priority="batch_prioritized"
    ),
    "gather-top1-groups8": dict(
        dispatch="gather", top_k=1, train_capacity_factor=0.5, group_size=8
    ),
    "dropless-top2": dict(
        dispatch="dropless", top_k=2, train_capacity_factor=None, eval_capacity_factor=None
    ),
}
RECIPES = {
    "sigmoid": dict(score="sigmoid"),
    "bias": dict(balance="bias"),
    "sigmoid-bias": dict(score="sigmoid", balance="bias"),
}
BIAS = np.array([0.25, -0.3, 0.1, 0.0])  # Large enough against scores in [0, 1] to move choices.


def _recipe_layer(path, recipe):
  layer = make_layer(**{"eval_capacity_factor": 0.5, **RECIPE_PATHS[path], **RECIPES[recipe]})
  if layer.router_bias is not None:
    layer.router_bias[...] = jnp.asarray(BIAS, jnp.float32)
  return layer, (BIAS if layer.router_bias is not None else None)


# Sigmoid scores need k >= 2 (MoEConfig refuses top-1): the top-1 path takes the bias alone.
RECIPE_CASES = [
    (path, recipe)
    for path in RECIPE_PATHS
    for recipe in RECIPES
    if RECIPE_PATHS[path]["top_k"] > 1 or "sigmoid" not in recipe
]


@pytest.mark.parametrize("masked", [False, True], ids=["all-real", "padded"])
@pytest.mark.parametrize("path, recipe", RECIPE_CASES, ids=[f"{p}-{r}" for p, r in RECIPE_CASES])
def test_recipes_match_reference_on_every_path(path, recipe, masked):
  """Outputs, losses, statistics and decisions equal the float64 reference's; the bias moves
  choices (the same layer without it routes differently) but never the gates' values."""
  layer, bias = _recipe_layer(path, recipe)
  x, mask = tokens(), (_padding_mask() if masked else None)
  y, aux = layer(x, train=True, token_mask_BL=mask)
  r = reference_moe(x, layer_params(layer), layer.cfg, train=True, token_mask_BL=mask, bias_E=bias)
  assert rel_err(y, r.y) < 1e-5
  assert_aux_matches(aux, r)
  expert_index, kept = layer.routing_decisions(x, train=True, token_mask_BL=mask)
  np.testing.assert_array_equal(expert_index, r.choices)
  np.testing.assert_array_equal(kept, r.kept)
  if masked:
    np.testing.assert_array_equal(np.asarray(y)[np.asarray(mask) == 0], 0.0)
  if bias is not None:
    unbiased = reference_moe(x, layer_params(layer), layer.cfg, train=True, token_mask_BL=mask)
    assert not np.array_equal(unbiased.choices, r.choices), "the bias must move choices here"


def test_the_bias_is_state_with_no_gradient():
  layer, _ = _recipe_layer("gather-top2-bpr", "sigmoid-bias")
  assert isinstance(layer.router_bias, balancing.RouterBias)
  assert not isinstance(layer.router_bias, nnx.Param)
  assert make_layer().router_bias is None  # balance='loss' (the default) holds none.
  x = tokens()

  graphdef, params, bias = nnx.split(layer, nnx.Param, balancing.RouterBias)

  def loss(params, bias):
    y, aux = nnx.merge(graphdef, params, bias)(x, train=True)
    return jnp.sum(y**2) + aux.losses.balance + aux.losses.z

  d_params, d_bias = jax.grad(loss, argnums=(0, 1))(params, bias)
  np.testing.assert_array_equal(d_bias["router_bias"][...], 0.0)
  assert np.abs(np.asarray(d_params["router"]["w"][...])).max() > 0


@pytest.mark.parametrize("masked", [False, True], ids=["all-real", "padded"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_global_and_sequence_balance_losses_match_reference(score, masked):
  """Four groups of 8 in 2 sequences of 16: the pooled loss, the per-group loss and the
  per-sequence loss are three different numbers, and each is the reference's."""
  x, mask = tokens(), (_padding_mask() if masked else None)
  values = {}
  for scope in ("group", "global"):
    layer = make_layer(
        dispatch="gather",
        top_k=2,
        group_size=8,
        score=score,
        balance_scope=scope,
        sequence_balance_weight=1e-4,
    )
    _, aux = layer(x, train=True, token_mask_BL=mask)
    r = reference_moe(x, layer_params(layer), layer.cfg, train=True, token_mask_BL=mask)
    np.testing.assert_allclose(aux.losses.balance, r.balance, rtol=1e-5)
    np.testing.assert_allclose(aux.losses.sequence_balance, r.sequence_balance, rtol=1e-5)
    values[scope] = r.balance
  assert abs(values["group"] - values["global"]) > 1e-4
  assert abs(r.sequence_balance - values["global"]) > 1e-4
  assert abs(r.sequence_balance - values["group"]) > 1e-4


@pytest.mark.parametrize("balance", ["loss", "bias", "none"])
def test_auxiliary_loss_adds_the_balance_loss_only_when_it_balances(balance):
  layer = make_layer(balance=balance, sequence_balance_weight=3e-4, group_size=8)
  _, aux = layer(tokens(), train=True)
  cfg = layer.cfg
  got = moe_layer.auxiliary_loss(cfg, aux.losses)
  want = cfg.z_loss_weight * float(aux.losses.z) + 3e-4 * float(aux.losses.sequence_balance)
  if balance == "loss":
    want += cfg.balance_loss_weight * float(aux.losses.balance)
  assert float(aux.losses.balance) > 0 and float(aux.losses.sequence_balance) > 0
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sequence_balance_is_zero_without_its_weight():
  _, aux = make_layer()(tokens(), train=True)
  assert float(aux.losses.sequence_balance) == 0.0
