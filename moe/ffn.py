"""Feed-forward networks: the dense MLP and a bank of E experts with the same activation.

Parameters are float32 and carry logical axis names; the computation runs in the configured dtype.
Weights are shaped [d, f] / [f, d] (dense) and [E, d, f] / [E, f, d] (experts), so an expert bank
with E=1 holds exactly the dense MLP's weights with a leading axis of 1 (a test relies on this).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe import axes
from moe.config import Activation

# Fan-in scaled truncated normal (the Transformer default the Switch paper starts from). For experts
# the leading E axis is a batch axis, not part of the fan-in.
dense_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
expert_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


def _param(init, rngs: nnx.Rngs, shape, names) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def _hidden(activation: Activation, gate, up):
  if activation is Activation.GELU:
    return jax.nn.gelu(up)
  return jax.nn.silu(gate) * up


class MLP(nnx.Module):
  """Dense FFN: y = W_out act(W_in x) (GELU) or W_down (silu(W_gate x) * W_up x) (SwiGLU)."""

  def __init__(
      self, d_model: int, hidden: int, activation: Activation, *, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.activation = activation
    self.dtype = dtype
    if activation is Activation.SWIGLU:
      self.w_gate = _param(dense_init, rngs, (d_model, hidden), (axes.EMBED, axes.MLP))
    self.w_in = _param(dense_init, rngs, (d_model, hidden), (axes.EMBED, axes.MLP))
    self.w_out = _param(dense_init, rngs, (hidden, d_model), (axes.MLP, axes.EMBED))

  def __call__(self, x_TD: jax.Array) -> jax.Array:
    """x: [..., d] -> [..., d] in `dtype`."""
    x_TD = x_TD.astype(self.dtype)
    up = jnp.einsum("...d,df->...f", x_TD, self.w_in[...].astype(self.dtype))
    gate = None
    if self.activation is Activation.SWIGLU:
      gate = jnp.einsum("...d,df->...f", x_TD, self.w_gate[...].astype(self.dtype))
    h = _hidden(self.activation, gate, up)
    return jnp.einsum("...f,fd->...d", h, self.w_out[...].astype(self.dtype))


class Experts(nnx.Module):
  """E independent FFNs, on per-expert buffers (batched) or on expert-sorted rows (grouped)."""

  def __init__(
      self,
      num_experts: int,
      d_model: int,
      hidden: int,
      activation: Activation,
      *,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.activation = activation
    self.dtype = dtype
    e, d, f = num_experts, d_model, hidden
    if activation is Activation.SWIGLU:
      self.w_gate = _param(expert_init, rngs, (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP))
    self.w_in = _param(expert_init, rngs, (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP))
    self.w_out = _param(expert_init, rngs, (e, f, d), (axes.EXPERT, axes.MLP, axes.EMBED))

  def _w(self, name):
    return getattr(self, name)[...].astype(self.dtype)

  def __call__(self, x_GECD: jax.Array) -> jax.Array:
    """Batched experts: x [G, E, C, d] -> [G, E, C, d]; expert e sees only x[:, e].

    The buffers are laid out expert-major, [E, G * C, d], for the matmuls: one batched GEMM per
    weight with every row of an expert contiguous. On the CPU this made the expert matmuls 1.6x
    faster than contracting the [G, E, C, d] layout directly (benchmarks/moe_breakdown.py, E=8); on
    an H200 it changed nothing (6.17 ms at E=64, C=16, either way), where at E=64 the time goes to
    the weights themselves: 64x the dense FFN's parameters, cast to bf16 and their gradients written
    every step.
    """
    g, e, c, d = x_GECD.shape
    x_EMD = jnp.swapaxes(x_GECD.astype(self.dtype), 0, 1).reshape(e, g * c, d)
    x_EMD = axes.constrain(x_EMD, (axes.ACT_EXPERT, axes.EXPERT_GROUP, axes.ACT_EMBED))
    up = jnp.einsum("emd,edf->emf", x_EMD, self._w("w_in"))
    up = axes.constrain(up, (axes.ACT_EXPERT, axes.EXPERT_GROUP, axes.ACT_MLP))
    gate = None
    if self.activation is Activation.SWIGLU:
      gate = jnp.einsum("emd,edf->emf", x_EMD, self._w("w_gate"))
    h = _hidden(self.activation, gate, up)
    y_EMD = jnp.einsum("emf,efd->emd", h, self._w("w_out"))
    return jnp.swapaxes(y_EMD.reshape(e, g, c, d), 0, 1)

  def grouped(self, x_TD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Grouped experts: rows of x [T, d] sorted by expert, group_sizes[e] rows for expert e.

    `jax.lax.ragged_dot` is the portable reference; it is slow on GPU and CPU (a later issue brings
    a fast grouped matmul).
    """
    x_TD = x_TD.astype(self.dtype)
    up = jax.lax.ragged_dot(x_TD, self._w("w_in"), group_sizes_E)
    gate = None
    if self.activation is Activation.SWIGLU:
      gate = jax.lax.ragged_dot(x_TD, self._w("w_gate"), group_sizes_E)
    h = _hidden(self.activation, gate, up)
    return jax.lax.ragged_dot(h, self._w("w_out"), group_sizes_E)
