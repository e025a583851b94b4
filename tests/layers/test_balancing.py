"""`moe.layers.balancing` against the float64 reference (`tests/moe_reference.py`): sigmoid scores,
the selection bias and its update, and the pooled and per-sequence balance losses, with padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from moe.config.enums import Score
from moe.layers import balancing, routing

G, S, E, K = 3, 8, 6, 2


def _logits(seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), (G, S, E)) * 2.0, np.float32)


def _mask(seed=1):
  real = np.array(jax.random.bernoulli(jax.random.key(seed), 0.75, (G, S)))
  real[:, 0] = True  # Every group keeps a real token.
  return real


@pytest.mark.parametrize("score", list(Score))
def test_probabilities_and_affinity(score):
  logits = _logits()
  probs, affinity = balancing.probabilities_and_affinity(jnp.asarray(logits), score)
  want_probs, want_affinity = ref.scores(logits, score)
  np.testing.assert_allclose(probs, want_probs, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(affinity, want_affinity, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("score", list(Score))
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("renormalize", (False, True))
def test_choose_picks_by_biased_scores_and_gates_by_unbiased_ones(score, with_bias, renormalize):
  logits, real = _logits(), _mask()
  _, affinity = ref.scores(logits, score)
  # A bias large enough to overturn choices: experts 0 and 1 strongly preferred.
  bias = np.array([3.0, 2.0, 0.0, -1.0, 0.5, 0.0]) if with_bias else None
  top = balancing.choose(
      jnp.asarray(affinity, jnp.float32),
      K,
      score=score,
      renormalize=renormalize,
      bias_E=None if bias is None else jnp.asarray(bias, jnp.float32),
      token_mask_GS=jnp.asarray(real),
  )
  for g in range(G):
    want = ref.top_k_choices(affinity[g], K, bias)
    np.testing.assert_array_equal(top.expert_index[g], want)
    gates = np.take_along_axis(affinity[g], want, axis=-1)
    if score is Score.SIGMOID or renormalize:
      gates = gates / gates.sum(-1, keepdims=True)
    gates = np.where(real[g][:, None], gates, 0.0)
    np.testing.assert_allclose(top.gates[g], gates, rtol=2e-6, atol=1e-7)
  if with_bias:  # The bias changed the choices, not only the order.
    unbiased = np.stack([ref.top_k_choices(affinity[g], K) for g in range(G)])
    assert (unbiased != np.asarray(top.expert_index)).any()


def test_the_bias_has_no_gradient_and_gates_keep_theirs():
  _, affinity = ref.scores(_logits(), Score.SIGMOID)

  def total(affinity, bias):
    top = balancing.choose(affinity, K, score=Score.SIGMOID, renormalize=False, bias_E=bias)
    return jnp.sum(top.gates)

  d_affinity, d_bias = jax.grad(total, argnums=(0, 1))(jnp.asarray(affinity), jnp.zeros(E))
  assert np.all(np.asarray(d_bias) == 0.0) and np.abs(np.asarray(d_affinity)).max() > 0


@pytest.mark.parametrize("masked", (False, True))
def test_bias_update_follows_the_global_load(masked):
  logits, real = _logits(), _mask() if masked else None
  probs, _ = ref.scores(logits, Score.SOFTMAX)
  choices = np.stack([ref.top_k_choices(probs[g], K) for g in range(G)])
  bias = np.linspace(-0.01, 0.01, E)
  want = ref.reference_bias_update(bias, choices, real, rate=1e-3)
  mask = None if real is None else jnp.asarray(real)
  load_E = jnp.mean(routing.expert_load(jnp.asarray(choices), E, mask), axis=0)
  got = balancing.updated_bias(jnp.asarray(bias, jnp.float32), load_E, 1e-3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert not np.allclose(want, bias)


def test_an_expert_at_the_mean_load_keeps_its_bias():
  load = jnp.array([0.25, 0.25, 0.3, 0.2])
  np.testing.assert_allclose(
      balancing.updated_bias(jnp.zeros(4), load, 0.1), [0.0, 0.0, -0.1, 0.1], atol=1e-7
  )


@pytest.mark.parametrize("masked", (False, True))
def test_global_balance_loss_pools_the_groups(masked):
  logits, real = _logits(2), _mask(3) if masked else None
  probs, _ = ref.scores(logits, Score.SOFTMAX)
  choices = np.stack([ref.top_k_choices(probs[g], K) for g in range(G)])
  mask = None if real is None else jnp.asarray(real)
  load = routing.expert_load(jnp.asarray(choices), E, mask)
  got = balancing.global_balance_loss(jnp.asarray(probs, jnp.float32), load, mask)
  assert float(got) == pytest.approx(ref.global_balance_loss(probs, choices, real), rel=1e-5)
  per_group = routing.load_balancing_loss(jnp.asarray(probs, jnp.float32), load, mask)
  assert abs(float(got) - float(per_group)) > 1e-4  # Pooling is not averaging per group here.
  one = slice(0, 1)  # With one group the two are the same number.
  m1 = None if mask is None else mask[one]
  np.testing.assert_allclose(
      balancing.global_balance_loss(jnp.asarray(probs[one], jnp.float32), load[one], m1),
      routing.load_balancing_loss(jnp.asarray(probs[one], jnp.float32), load[one], m1),
      rtol=1e-6,
  )


def test_sequence_balance_loss_is_the_switch_loss_per_sequence():
  logits, real = _logits(4), _mask(5)
  probs, _ = ref.scores(logits, Score.SIGMOID)
  choices = np.stack([ref.top_k_choices(probs[g], K) for g in range(G)])
  got = balancing.sequence_balance_loss(
      jnp.asarray(probs, jnp.float32), jnp.asarray(choices), jnp.asarray(real)
  )
  assert float(got) == pytest.approx(ref.balance_loss(probs, choices, real), rel=1e-5)
