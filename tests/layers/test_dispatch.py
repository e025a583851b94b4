"""moe/layers/dispatch.py: slot assignment and the three dispatch paths against a per-claim numpy
reference, given the routing decisions (so these tests do not depend on the router)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from moe.config.enums import Priority, ServingOrder
from moe.layers import dispatch, routing

D = 8


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _random_routing(seed, g=3, s=32, e=4, k=2):
  key_p, key_x = jax.random.split(jax.random.key(seed))
  logits = 3.0 * jax.random.normal(key_p, (g, s, e))
  probs = jax.nn.softmax(logits)
  top = routing.tokens_choose(probs, k, renormalize=False)
  x = jax.random.normal(key_x, (g, s, D))
  return probs, top, x


def _expert_weight(e):
  return jax.random.normal(jax.random.key(7), (e, D, D))


def _linear_experts(e):
  w = _expert_weight(e)
  return lambda x_GECD: jnp.einsum("gecd,edf->gecf", x_GECD, w)


def _linear_grouped(e):
  """Expert-sorted rows [T, d] and group sizes [E] -> [T, d], one row at a time."""
  w = _expert_weight(e)
  return lambda x_TD, sizes: jnp.concatenate(
      [x_TD[i : i + 1] @ w[j] for j, i in _rows_by_group(sizes)]
  )


def _rows_by_group(sizes):
  """(expert, row) for each row of an expert-sorted matrix with the given group sizes."""
  start = 0
  for j, n in enumerate(np.asarray(sizes)):
    for i in range(start, start + int(n)):
      yield j, i
    start += int(n)


def _reference(x, probs, top, priority, c):
  """Per-claim reference: (y [G, S, d], kept [G, S, k], slots [G, S, k]) with linear experts."""
  w = np.asarray(_expert_weight(probs.shape[-1]), np.float64)
  x, p = np.asarray(x, np.float64), np.asarray(probs, np.float64)
  idx, gates = np.asarray(top.expert_index), np.asarray(top.gates, np.float64)
  g, s, k = idx.shape
  y, kept, slots = np.zeros(x.shape), np.zeros((g, s, k), bool), np.zeros((g, s, k), int)
  for gi in range(g):
    slots[gi] = ref.claim_slots(idx[gi], ref.serving_order(p[gi], priority), p.shape[-1])
    kept[gi] = slots[gi] < c
    assignments = [
        (t, idx[gi, t, r], gates[gi, t, r]) for t in range(s) for r in range(k) if kept[gi, t, r]
    ]
    y[gi] = ref.combine(x[gi], assignments, lambda e, x_D: x_D @ w[e])
  return y, kept, slots


@pytest.mark.parametrize("slots_fn", [dispatch.slots_by_cumsum, dispatch.slots_by_sort])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("priority", list(Priority))
def test_slots_match_reference(slots_fn, k, priority):
  probs, top, x = _random_routing(seed=11, k=k)
  order = routing.priority_order(probs, priority)
  _, _, slots_ref = _reference(x, probs, top, priority, c=32)
  np.testing.assert_array_equal(slots_fn(top.expert_index, order, 4), slots_ref)


@pytest.mark.parametrize(
    "run", [dispatch.einsum_moe, dispatch.gather_moe], ids=["einsum", "gather"]
)
@pytest.mark.parametrize("k, cf", [(1, 0.5), (2, 0.5), (2, 1.0), (2, None)])
@pytest.mark.parametrize("priority", list(Priority))
def test_capacity_paths_match_reference(run, k, cf, priority):
  e, s = 4, 32
  probs, top, x = _random_routing(seed=5, s=s, e=e, k=k)
  c = ref.reference_capacity(s, e, k, cf, min_capacity=1)
  order = routing.priority_order(probs, priority)
  y, kept = run(x, top.expert_index, top.gates, order, c, e, _linear_experts(e))
  y_ref, kept_ref, _ = _reference(x, probs, top, priority, c)
  np.testing.assert_array_equal(kept, kept_ref)
  assert rel_err(y, y_ref) < 1e-5
  if cf == 0.5:
    assert not kept_ref.all(), "the test must exercise drops"


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_matches_reference(k):
  e = 4
  probs, top, x = _random_routing(seed=6, e=e, k=k)
  y, kept = dispatch.dropless_moe(x, top.expert_index, top.gates, _linear_grouped(e), e)
  y_ref, kept_ref, _ = _reference(x, probs, top, Priority.INDEX, c=10**9)
  assert kept_ref.all()
  np.testing.assert_array_equal(kept, kept_ref)
  assert rel_err(y, y_ref) < 1e-5


@pytest.mark.parametrize("cf", [0.25, 0.5, 0.75, 1.0, 1.25, 2.0, None])
@pytest.mark.parametrize("priority", list(Priority))
def test_einsum_and_gather_agree_and_respect_capacity(cf, priority):
  e, k, s = 4, 2, 32
  probs, top, x = _random_routing(seed=3, s=s, e=e, k=k)
  c = ref.reference_capacity(s, e, k, cf, min_capacity=1)
  order = routing.priority_order(probs, priority)
  experts = _linear_experts(e)
  y_e, kept_e = dispatch.einsum_moe(x, top.expert_index, top.gates, order, c, e, experts)
  y_g, kept_g = dispatch.gather_moe(x, top.expert_index, top.gates, order, c, e, experts)
  np.testing.assert_array_equal(kept_e, kept_g)
  assert rel_err(y_g, y_e) < 1e-5
  # No expert ever receives more than C tokens in a group.
  per_expert = np.zeros((x.shape[0], e), int)
  np.add.at(
      per_expert,
      (
          np.arange(x.shape[0])[:, None, None].repeat(s, 1).repeat(k, 2),
          np.asarray(top.expert_index),
      ),
      np.asarray(kept_e).astype(int),
  )
  assert per_expert.max() <= c
  if cf is None:  # C = S: nothing drops, and the dropless path computes the same function.
    assert np.asarray(kept_e).all()
    y_d, _ = dispatch.dropless_moe(x, top.expert_index, top.gates, _linear_grouped(e), e)
    assert rel_err(y_d, y_e) < 1e-5


@pytest.mark.parametrize(
    "run", [dispatch.einsum_expert_choice, dispatch.gather_expert_choice], ids=["einsum", "gather"]
)
@pytest.mark.parametrize("c", [3, 4])
def test_expert_choice_paths_match_reference(run, c):
  e = 4
  probs, _, x = _random_routing(seed=8, s=16, e=e)
  choice = routing.experts_choose(probs, c)
  y, covered = run(x, choice.token_index, choice.gates, _linear_experts(e))
  w = np.asarray(_expert_weight(e), np.float64)
  p, xs = np.asarray(probs, np.float64), np.asarray(x, np.float64)
  g, s, _ = p.shape
  y_ref, covered_ref = np.zeros(xs.shape), np.zeros((g, s, 1), bool)
  for gi in range(g):
    picks = ref.experts_pick(p[gi], c)
    assignments = [(t, ei, p[gi, t, ei]) for ei in range(e) for t in picks[ei]]
    y_ref[gi] = ref.combine(xs[gi], assignments, lambda ei, x_D: x_D @ w[ei])
    covered_ref[gi, [t for t, _, _ in assignments], 0] = True
  # Tokens taken by several experts (sum of their outputs) and by none (zero) must both occur.
  assert not covered_ref.all()
  assert any(np.bincount(ref.experts_pick(p[gi], c).ravel()).max() > 1 for gi in range(g))
  np.testing.assert_array_equal(covered, covered_ref)
  assert rel_err(y, y_ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# Padding and the serving order.


def _padding(seed, g, s, fraction=0.4):
  """A random padding mask, bool [G, S] (True: real), with padding in every group."""
  real = np.asarray(jax.random.uniform(jax.random.key(seed), (g, s))) > fraction
  real[:, 0] = False  # Padding in every group, before real tokens.
  real[:, 1] = True  # And a real token in every group.
  return jnp.asarray(real)


def _reference_padded(x, probs, top, priority, c, real, token_major):
  """Per-claim reference with padding and a serving order: (y [G, S, d], kept [G, S, k], slots)."""
  w = np.asarray(_expert_weight(probs.shape[-1]), np.float64)
  x, p, real = np.asarray(x, np.float64), np.asarray(probs, np.float64), np.asarray(real)
  idx, gates = np.asarray(top.expert_index), np.asarray(top.gates, np.float64)
  g, s, k = idx.shape
  y, slots = np.zeros(x.shape), np.zeros((g, s, k), int)
  for gi in range(g):
    order = ref.serving_order(p[gi], priority)
    slots[gi] = ref.claim_slots(idx[gi], order, p.shape[-1], real[gi], token_major)
  kept = slots < c
  for gi in range(g):
    assignments = [
        (t, idx[gi, t, r], gates[gi, t, r]) for t in range(s) for r in range(k) if kept[gi, t, r]
    ]
    y[gi] = ref.combine(x[gi], assignments, lambda e, x_D: x_D @ w[e])
  return y, kept, slots


SMALLEST_PROBS = jnp.asarray(
    [[[0.9, 0.1], [0.8, 0.2]]], jnp.float32
)  # S=2, E=2: both want expert 0.


@pytest.mark.parametrize(
    "run", [dispatch.einsum_moe, dispatch.gather_moe], ids=["einsum", "gather"]
)
def test_smallest_padding_example_real_token_keeps_its_expert(run):
  """issue 11: S=2, E=2, k=1, C=1, token 0 padded: the real token 1 keeps expert 0. Without the
  mask (or with the padded token's probabilities zeroed, which still claims expert 0) it drops."""
  top = routing.tokens_choose(SMALLEST_PROBS, 1, renormalize=False)
  x = jax.random.normal(jax.random.key(0), (1, 2, D))
  order = routing.priority_order(SMALLEST_PROBS, Priority.INDEX)
  mask = jnp.asarray([[False, True]])
  y, kept = run(x, top.expert_index, top.gates, order, 1, 2, _linear_experts(2), token_mask_GS=mask)
  np.testing.assert_array_equal(kept, [[[False], [True]]])
  w0 = np.asarray(_expert_weight(2)[0], np.float64)
  np.testing.assert_allclose(y[0, 1], 0.8 * np.asarray(x[0, 1], np.float64) @ w0, rtol=1e-5)
  np.testing.assert_array_equal(y[0, 0], np.zeros(D))
  zeroed = routing.tokens_choose(SMALLEST_PROBS * jnp.asarray([[[0.0], [1.0]]]), 1, False)
  _, kept_zeroed = run(x, zeroed.expert_index, zeroed.gates, order, 1, 2, _linear_experts(2))
  np.testing.assert_array_equal(kept_zeroed, [[[True], [False]]])


@pytest.mark.parametrize("slots_fn", [dispatch.slots_by_cumsum, dispatch.slots_by_sort])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("priority", list(Priority))
@pytest.mark.parametrize("order_kind", list(ServingOrder))
def test_slots_with_padding_and_serving_order_match_reference(slots_fn, k, priority, order_kind):
  probs, top, x = _random_routing(seed=12, k=k)
  real = _padding(1, *probs.shape[:2])
  order = routing.priority_order(probs, priority)
  token_major = order_kind is ServingOrder.TOKEN_MAJOR
  _, _, slots_ref = _reference_padded(x, probs, top, priority, 32, real, token_major)
  slots = slots_fn(top.expert_index, order, 4, token_mask_GS=real, serving_order=order_kind)
  padded = slots_ref == ref.NO_SLOT
  assert padded.any() and not padded.all()
  np.testing.assert_array_equal(np.asarray(slots)[~padded], slots_ref[~padded])
  # A padded token's claims get a slot no capacity reaches (C <= S).
  assert (np.asarray(slots)[padded] >= probs.shape[1]).all()


@pytest.mark.parametrize(
    "run", [dispatch.einsum_moe, dispatch.gather_moe], ids=["einsum", "gather"]
)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("order_kind", list(ServingOrder))
@pytest.mark.parametrize("padded", [False, True])
def test_capacity_paths_with_padding_and_serving_order_match_reference(run, k, order_kind, padded):
  e, s = 4, 32
  probs, top, x = _random_routing(seed=9, s=s, e=e, k=k)
  real = _padding(2, 3, s) if padded else jnp.ones((3, s), bool)
  c = ref.reference_capacity(s, e, k, 0.5, min_capacity=1)
  order = routing.priority_order(probs, Priority.INDEX)
  token_major = order_kind is ServingOrder.TOKEN_MAJOR
  y, kept = run(
      x,
      top.expert_index,
      top.gates,
      order,
      c,
      e,
      _linear_experts(e),
      token_mask_GS=real,
      serving_order=order_kind,
  )
  y_ref, kept_ref, _ = _reference_padded(x, probs, top, Priority.INDEX, c, real, token_major)
  np.testing.assert_array_equal(kept, kept_ref)
  assert rel_err(y, y_ref) < 1e-5
  assert not kept_ref[np.asarray(real)].all(), "the test must exercise drops"
  np.testing.assert_array_equal(np.asarray(y)[~np.asarray(real)], 0.0)


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_with_padding_matches_reference(k):
  e = 4
  probs, top, x = _random_routing(seed=6, e=e, k=k)
  real = _padding(3, *probs.shape[:2])
  y, kept = dispatch.dropless_moe(
      x, top.expert_index, top.gates, _linear_grouped(e), e, token_mask_GS=real
  )
  y_ref, kept_ref, _ = _reference_padded(x, probs, top, Priority.INDEX, 10**8, real, False)
  np.testing.assert_array_equal(kept, kept_ref)
  np.testing.assert_array_equal(kept, np.broadcast_to(np.asarray(real)[..., None], kept.shape))
  assert rel_err(y, y_ref) < 1e-5
  np.testing.assert_array_equal(np.asarray(y)[~np.asarray(real)], 0.0)


@pytest.mark.optimized_compile  # Bit-identity of two programs: see conftest.py.
def test_all_real_mask_is_bit_identical_to_no_mask():
  e, s, k = 4, 32, 2
  probs, top, x = _random_routing(seed=4, s=s, e=e, k=k)
  ones = jnp.ones((3, s), bool)
  order = routing.priority_order(probs, Priority.BATCH_PRIORITIZED)
  for run in (dispatch.einsum_moe, dispatch.gather_moe):
    y, kept = run(x, top.expert_index, top.gates, order, 8, e, _linear_experts(e))
    y1, kept1 = run(
        x, top.expert_index, top.gates, order, 8, e, _linear_experts(e), token_mask_GS=ones
    )
    np.testing.assert_array_equal(y1, y)
    np.testing.assert_array_equal(kept1, kept)
  y, _ = dispatch.dropless_moe(x, top.expert_index, top.gates, _linear_grouped(e), e)
  y1, _ = dispatch.dropless_moe(x, top.expert_index, top.gates, _linear_grouped(e), e, ones)
  np.testing.assert_array_equal(y1, y)


def test_token_major_serves_a_tokens_second_choice_before_later_first_choices():
  """The cost of token-major order: token 0's second choice takes the slot that token 1's first
  choice gets in rank-major order (S=2, E=2, k=2, C=1)."""
  probs = jnp.asarray([[[0.6, 0.4], [0.3, 0.7]]], jnp.float32)
  top = routing.tokens_choose(probs, 2, renormalize=False)  # Token 0: [0, 1]; token 1: [1, 0].
  order = routing.priority_order(probs, Priority.INDEX)
  kept = (
      lambda so: np.asarray(dispatch.slots_by_sort(top.expert_index, order, 2, serving_order=so))
      < 1
  )
  np.testing.assert_array_equal(kept(ServingOrder.RANK_MAJOR), [[[True, False], [True, False]]])
  np.testing.assert_array_equal(kept(ServingOrder.TOKEN_MAJOR), [[[True, True], [False, False]]])
