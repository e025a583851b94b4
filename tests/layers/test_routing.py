"""moe/layers/routing.py: the router, the routing decisions, the losses and the statistics, function by
function, against float64 numpy (tests/moe_reference.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_reference as ref
from moe.config.enums import Priority
from moe.layers import routing


def _probs(seed, g=2, s=12, e=4, scale=2.0, duplicate_rows=True):
  """float32 probabilities [G, S, E]. With `duplicate_rows`, some tokens share their logits
  exactly and some experts tie within a token, so the tie-breaking rules are exercised."""
  logits = scale * np.asarray(jax.random.normal(jax.random.key(seed), (g, s, e)), np.float32)
  if duplicate_rows:
    logits[:, 1] = logits[:, 0]  # Identical tokens: ties in priority and for experts choose.
    logits[:, 5] = logits[:, 3]
    logits[:, 2, 1:3] = logits[:, 2, 0]  # Experts 0, 1 and 2 tie for token 2.
    logits[:, 4, :] = 0.0  # Every expert ties.
  return jax.nn.softmax(jnp.asarray(logits), axis=-1)


def _make_router(d=8, e=4, jitter_eps=0.0):
  with nnx.use_eager_sharding(False):
    return routing.Router(d, e, jitter_eps=jitter_eps, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------------
# Router.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_router_logits_are_float32_x_times_w(dtype):
  router = _make_router()
  x = jax.random.normal(jax.random.key(1), (2, 5, 8), dtype)
  logits = router(x)
  assert logits.dtype == jnp.float32
  # The bfloat16 input is upcast exactly; the product must then be float32-accurate (not bf16).
  expected = np.asarray(x, np.float64) @ np.asarray(router.w[...], np.float64)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_jitter_only_in_training():
  router = _make_router(jitter_eps=0.1)
  x = jax.random.normal(jax.random.key(1), (2, 16, 8))
  np.testing.assert_array_equal(router(x), router(x, train=False, rng=jax.random.key(0)))
  noisy = router(x, train=True, rng=jax.random.key(0))
  assert not np.allclose(noisy, router(x))
  with pytest.raises(ValueError, match="jitter"):
    router(x, train=True)


def test_jitter_multiplies_each_input_by_one_plus_at_most_eps():
  # With d = 1 each logit is x * u * w, so logit ratios noisy / clean are the noise factors u.
  eps = 0.1
  router = _make_router(d=1, e=3, jitter_eps=eps)
  x = jax.random.normal(jax.random.key(2), (1, 64, 1)) + 3.0  # Away from zero: ratios well defined.
  ratio = np.asarray(router(x, train=True, rng=jax.random.key(0))) / np.asarray(router(x))
  # One noise factor per input feature: the same for all experts of a token.
  np.testing.assert_allclose(ratio, ratio[..., :1] * np.ones_like(ratio), rtol=1e-5)
  assert np.all(ratio >= 1 - eps - 1e-6) and np.all(ratio <= 1 + eps + 1e-6)
  assert np.std(ratio[..., 0]) > eps / 10, "the noise must actually vary from token to token"


# --------------------------------------------------------------------------------------------------
# Routing decisions.


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [False, True])
def test_tokens_choose_matches_reference(k, renormalize):
  probs = _probs(seed=0)
  top = routing.tokens_choose(probs, k, renormalize)
  p = np.asarray(probs, np.float64)
  for g in range(p.shape[0]):
    choices = ref.top_k_choices(p[g], k)
    np.testing.assert_array_equal(top.expert_index[g], choices)
    gates = np.take_along_axis(p[g], choices, axis=1)
    if renormalize:
      gates = gates / gates.sum(-1, keepdims=True)
    np.testing.assert_allclose(top.gates[g], gates, rtol=1e-6)
  assert top.expert_index.dtype == jnp.int32


@pytest.mark.parametrize("c", [1, 3, 12])
def test_experts_choose_matches_reference(c):
  probs = _probs(seed=1)
  choice = routing.experts_choose(probs, c)
  p = np.asarray(probs, np.float64)
  for g in range(p.shape[0]):
    picks = ref.experts_pick(p[g], c)
    np.testing.assert_array_equal(choice.token_index[g], picks)
    np.testing.assert_allclose(choice.gates[g], p[g][picks, np.arange(4)[:, None]], rtol=1e-6)


@pytest.mark.parametrize("priority", list(Priority))
def test_priority_order_matches_reference(priority):
  probs = _probs(seed=2)
  order = routing.priority_order(probs, priority)
  p = np.asarray(probs, np.float64)
  for g in range(p.shape[0]):
    np.testing.assert_array_equal(order[g], ref.serving_order(p[g], priority))


def test_expert_load_matches_reference():
  probs = _probs(seed=3, duplicate_rows=False)
  for k in (1, 2):
    top = routing.tokens_choose(probs, k, renormalize=False)
    np.testing.assert_allclose(
        routing.expert_load(top.expert_index, 4),
        ref.assignment_fraction(np.asarray(top.expert_index), 4),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------------------------------
# Losses.


def _routing_with_favourites(favourites_SK, e):
  """Logits whose top-k are exactly the given experts, with probability ~1 on the first."""
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
  """E * sum_e f_e P_e, f from the top-k choices, P the mean probability; only P has a gradient."""
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
  np.testing.assert_allclose(
      grad_probs, 4 * np.asarray(load)[:, None, :] / (6 * 2) * np.ones((2, 6, 4)), rtol=1e-6
  )


def test_z_loss_formula():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3)), np.float64) * 4
  lse = np.log(np.sum(np.exp(logits), axis=-1))
  np.testing.assert_allclose(
      routing.router_z_loss(jnp.asarray(logits, jnp.float32)), np.mean(lse**2), rtol=1e-6
  )
  np.testing.assert_allclose(
      routing.router_z_loss(jnp.zeros((1, 3, 8))), math.log(8) ** 2, rtol=1e-6
  )


# --------------------------------------------------------------------------------------------------
# Statistics.


def _kept_by_reference(p_GSE, choices_GSK, priority, c):
  return np.stack(
      [
          ref.claim_slots(choices_GSK[g], ref.serving_order(p_GSE[g], priority), 4) < c
          for g in range(p_GSE.shape[0])
      ]
  )


@pytest.mark.parametrize("k, c", [(1, 2), (2, 3), (2, 12)])
def test_router_stats_match_reference(k, c):
  """Every statistic against the reference, from the same probabilities and the same kept claims."""
  probs = _probs(seed=4, scale=1.5, duplicate_rows=False)
  p = np.asarray(probs, np.float64)
  g, s, e = p.shape
  choices = np.stack([ref.top_k_choices(p[gi], k) for gi in range(g)])
  kept = _kept_by_reference(p, choices, Priority.INDEX, c)
  load = ref.assignment_fraction(choices, e)
  stats = routing.router_stats(probs, jnp.asarray(load, jnp.float32), jnp.asarray(kept), c)
  expected = ref.router_stats(p, load, kept, kept.sum(axis=(1, 2)), e * c)
  if c < s:
    assert not kept.all(), "the test must exercise drops"
  else:
    np.testing.assert_allclose(expected.capacity_used, k / e)  # C = S: k * S of E * S slots.
  np.testing.assert_allclose(stats.dropped_fraction, expected.dropped_fraction, atol=1e-6)
  np.testing.assert_allclose(stats.expert_load, expected.expert_load, rtol=1e-6)
  np.testing.assert_allclose(stats.router_entropy, expected.router_entropy, rtol=1e-5)
  np.testing.assert_allclose(stats.top1_probability, expected.top1_probability, rtol=1e-6)
  np.testing.assert_allclose(stats.capacity_used, expected.capacity_used, rtol=1e-6)


def test_router_stats_without_buffers_use_every_slot():
  """capacity=None (dropless: every assignment computed, no padded rows): capacity_used 1."""
  probs = _probs(seed=5, duplicate_rows=False)
  p = np.asarray(probs, np.float64)
  g, s, e = p.shape
  choices = np.stack([ref.top_k_choices(p[gi], 2) for gi in range(g)])
  kept = np.ones((g, s, 2), bool)
  stats = routing.router_stats(
      probs, jnp.asarray(ref.assignment_fraction(choices, e)), jnp.asarray(kept), None
  )
  expected = ref.router_stats(
      p, ref.assignment_fraction(choices, e), kept, kept.sum(axis=(1, 2)), 2 * s
  )
  np.testing.assert_allclose(expected.capacity_used, 1.0)
  np.testing.assert_allclose(stats.capacity_used, expected.capacity_used, rtol=1e-6)
  np.testing.assert_array_equal(stats.dropped_fraction, [0.0, 0.0])


# --------------------------------------------------------------------------------------------------
# Padding.


def _real(seed, g=2, s=12):
  """A random padding mask, bool [G, S] (True: real), with padding and real tokens in each group."""
  real = np.asarray(jax.random.uniform(jax.random.key(seed), (g, s))) > 0.5
  real[:, 0], real[:, -1] = False, True
  return real


@pytest.mark.parametrize("c", [1, 3, 12])
def test_experts_never_pick_padding_while_real_tokens_remain(c):
  probs = _probs(seed=1)
  real = _real(seed=2)
  real[1] = False
  real[1, 3] = True  # Group 1 has one real token: every expert must take it, then padding.
  choice = routing.experts_choose(probs, c, jnp.asarray(real))
  p = np.asarray(probs, np.float64)
  for g in range(p.shape[0]):
    picks = ref.experts_pick(p[g], c, real[g])
    np.testing.assert_array_equal(choice.token_index[g], picks)
    expected_gates = np.where(real[g][picks], p[g][picks, np.arange(4)[:, None]], 0.0)
    np.testing.assert_allclose(choice.gates[g], expected_gates, rtol=1e-6)
  assert (np.asarray(choice.token_index[1, :, 0]) == 3).all()


def test_tokens_choose_gives_padded_tokens_gate_zero():
  probs = _probs(seed=3)
  real = _real(seed=4)
  plain = routing.tokens_choose(probs, 2, renormalize=True)
  masked = routing.tokens_choose(probs, 2, renormalize=True, token_mask_GS=jnp.asarray(real))
  np.testing.assert_array_equal(masked.expert_index, plain.expert_index)
  np.testing.assert_array_equal(masked.gates, np.where(real[..., None], plain.gates, 0.0))


def test_balance_loss_with_padding_smallest_example_by_hand():
  """S=2, E=2, k=1, probs [[.9, .1], [.8, .2]], token 0 padded (flaxformer's convention): f = [1/2,
  0] (one real assignment over k * S = 2), P = [.8, .2] / 2, loss = E * f . P = 2 * .5 * .4."""
  probs = jnp.asarray([[[0.9, 0.1], [0.8, 0.2]]], jnp.float32)
  mask = jnp.asarray([[False, True]])
  top = routing.tokens_choose(probs, 1, renormalize=False, token_mask_GS=mask)
  load = routing.expert_load(top.expert_index, 2, mask)
  np.testing.assert_allclose(load, [[0.5, 0.0]], rtol=1e-7)
  np.testing.assert_allclose(routing.load_balancing_loss(probs, load, mask), 0.4, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_with_padding_matches_reference(k):
  probs = _probs(seed=5, duplicate_rows=False)
  real = _real(seed=6)
  mask = jnp.asarray(real)
  top = routing.tokens_choose(probs, k, renormalize=False, token_mask_GS=mask)
  load = routing.expert_load(top.expert_index, 4, mask)
  p, idx = np.asarray(probs, np.float64), np.asarray(top.expert_index)
  np.testing.assert_allclose(load, ref.assignment_fraction(idx, 4, real), rtol=1e-6)
  np.testing.assert_allclose(
      routing.load_balancing_loss(probs, load, mask), ref.balance_loss(p, idx, real), rtol=1e-6
  )


def test_z_loss_with_padding_is_the_mean_over_real_tokens():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (2, 12, 3)), np.float64) * 4
  real = _real(seed=7)
  lse = np.log(np.sum(np.exp(logits), axis=-1))
  np.testing.assert_allclose(
      routing.router_z_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(real)),
      np.mean(lse[real] ** 2),
      rtol=1e-6,
  )
  no_real = jnp.zeros((2, 12), bool)
  assert routing.router_z_loss(jnp.asarray(logits, jnp.float32), no_real) == 0.0


@pytest.mark.parametrize("k, c", [(1, 1), (2, 2)])
def test_router_stats_with_padding_match_reference(k, c):
  probs = _probs(seed=4, scale=1.5, duplicate_rows=False)
  p = np.asarray(probs, np.float64)
  g, s, e = p.shape
  real = _real(seed=8)
  real[1, :9] = False  # Groups with different numbers of real tokens: pooled, not averaged.
  choices = np.stack([ref.top_k_choices(p[gi], k) for gi in range(g)])
  order = ref.serving_order(p[0], Priority.INDEX)
  kept = np.stack([ref.claim_slots(choices[gi], order, e, real[gi]) < c for gi in range(g)])
  mask = jnp.asarray(real)
  load = routing.expert_load(jnp.asarray(choices), e, mask)
  stats = routing.router_stats(probs, load, jnp.asarray(kept), c, mask)
  share_GE = np.zeros((g, e))  # Each group's share of its real assignments.
  for gi, t in zip(*np.nonzero(real)):
    for ei in choices[gi, t]:
      share_GE[gi, ei] += 1.0 / (k * real[gi].sum())
  expected = ref.router_stats(p, share_GE, kept, kept.sum(axis=(1, 2)), e * c, real)
  assert not kept[real].all(), "the test must exercise drops"
  np.testing.assert_allclose(stats.dropped_fraction, expected.dropped_fraction, atol=1e-6)
  np.testing.assert_allclose(stats.expert_load, expected.expert_load, rtol=1e-6)
  np.testing.assert_allclose(np.sum(stats.expert_load), 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats.router_entropy, expected.router_entropy, rtol=1e-5)
  np.testing.assert_allclose(stats.top1_probability, expected.top1_probability, rtol=1e-6)
  np.testing.assert_allclose(stats.capacity_used, expected.capacity_used, rtol=1e-6)


@pytest.mark.optimized_compile  # Bit-identity of two programs: see conftest.py.
def test_all_real_mask_is_bit_identical_to_no_mask():
  probs = _probs(seed=9, duplicate_rows=False)
  logits = jnp.log(probs)
  ones = jnp.ones(probs.shape[:2], bool)
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(routing.tokens_choose(probs, 2, True, ones), routing.tokens_choose(probs, 2, True))
  same(routing.experts_choose(probs, 3, ones), routing.experts_choose(probs, 3))
  top = routing.tokens_choose(probs, 2, False)
  load = routing.expert_load(top.expert_index, 4)
  same(routing.expert_load(top.expert_index, 4, ones), load)
  same(routing.load_balancing_loss(probs, load, ones), routing.load_balancing_loss(probs, load))
  same(routing.router_z_loss(logits, ones), routing.router_z_loss(logits))
  kept = jnp.asarray(np.asarray(jax.random.uniform(jax.random.key(1), top.gates.shape)) > 0.3)
  same(routing.router_stats(probs, load, kept, 3, ones), routing.router_stats(probs, load, kept, 3))
