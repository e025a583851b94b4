"""moe/layers/ffn.py: the dense MLP and the expert bank (buffers and grouped rows) against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_reference as ref
from moe.config.enums import Activation
from moe.layers.ffn import Experts, MLP

D, F, E = 8, 16, 3


def _weights(module):
  return {
      name: np.asarray(getattr(module, name)[...], np.float64)
      for name in ("w_in", "w_out", "w_gate")
      if hasattr(module, name)
  }


@pytest.mark.parametrize("activation", list(Activation))
def test_mlp_matches_numpy(activation):
  with nnx.use_eager_sharding(False):
    mlp = MLP(D, F, activation, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, D))
  # The dense MLP is expert 0 of a one-expert bank with the same weights.
  params = {name: w[None] for name, w in _weights(mlp).items()}
  xs = np.asarray(x, np.float64)
  expected = np.stack(
      [[ref.expert_ffn(xs[b, t], params, 0, activation) for t in range(3)] for b in range(2)]
  )
  np.testing.assert_allclose(mlp(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", list(Activation))
def test_experts_on_buffers_and_grouped_rows_match_numpy(activation):
  with nnx.use_eager_sharding(False):
    experts = Experts(E, D, F, activation, rngs=nnx.Rngs(0))
  params = _weights(experts)

  # Buffers [G, E, C, d]: expert e sees only x[:, e].
  x_GECD = jax.random.normal(jax.random.key(1), (2, E, 3, D))
  xs = np.asarray(x_GECD, np.float64)
  expected = np.zeros(xs.shape)
  for g in range(2):
    for e in range(E):
      for c in range(3):
        expected[g, e, c] = ref.expert_ffn(xs[g, e, c], params, e, activation)
  np.testing.assert_allclose(experts(x_GECD), expected, rtol=1e-5, atol=1e-6)

  # Grouped rows: sizes (2, 0, 3), so expert 1 gets no row and rows 2-4 belong to expert 2.
  sizes = jnp.array([2, 0, 3], jnp.int32)
  x_TD = jax.random.normal(jax.random.key(2), (5, D))
  rows = np.asarray(x_TD, np.float64)
  owner = [0, 0, 2, 2, 2]
  expected = np.stack([ref.expert_ffn(rows[t], params, owner[t], activation) for t in range(5)])
  np.testing.assert_allclose(experts.grouped(x_TD, sizes), expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters():
  with nnx.use_eager_sharding(False):
    experts = Experts(E, D, F, Activation.GELU, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = experts(jnp.ones((1, E, 2, D), jnp.float32))
  assert y.dtype == jnp.bfloat16
  assert experts.w_in[...].dtype == jnp.float32
