"""Feed-forward networks: the dense MLP and a bank of E experts with the same activation.

Parameters are float32 and carry logical axis names; the computation runs in the configured dtype.
Weights are shaped [d, f] / [f, d] (dense) and [E, d, f] / [E, f, d] (experts), so an expert bank
with E=1 holds exactly the dense MLP's weights with a leading axis of 1 (a test relies on this).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.enums import Activation, GroupedMatmul
from moe.kernels.grouped_matmul import grouped_matmul, resolve
from moe.parallel import axes

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
  """E independent FFNs, on per-expert buffers (batched) or on expert-sorted rows (grouped).

  `grouped_matmul` (`GroupedMatmul`) is the kernel of `grouped`; it is resolved for the default
  backend here, so a kernel that is not available fails when the layer is built, not when it runs.
  """

  def __init__(
      self,
      num_experts: int,
      d_model: int,
      hidden: int,
      activation: Activation,
      *,
      dtype=jnp.float32,
      grouped_matmul: GroupedMatmul | str = GroupedMatmul.AUTO,
      rngs: nnx.Rngs,
  ):
    self.activation = activation
    self.dtype = dtype
    self.grouped_matmul = resolve(grouped_matmul)
    e, d, f = num_experts, d_model, hidden
    if activation is Activation.SWIGLU:
      self.w_gate = _param(expert_init, rngs, (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP))
    self.w_in = _param(expert_init, rngs, (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP))
    self.w_out = _param(expert_init, rngs, (e, f, d), (axes.EXPERT, axes.MLP, axes.EMBED))

  def _weight(self, name):
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
    x_ECD = jnp.swapaxes(x_GECD.astype(self.dtype), 0, 1).reshape(e, g * c, d)
    x_ECD = axes.constrain(x_ECD, (axes.ACT_EXPERT, axes.EXPERT_GROUP, axes.ACT_EMBED))
    up = jnp.einsum("emd,edf->emf", x_ECD, self._weight("w_in"))
    up = axes.constrain(up, (axes.ACT_EXPERT, axes.EXPERT_GROUP, axes.ACT_MLP))
    gate = None
    if self.activation is Activation.SWIGLU:
      gate = jnp.einsum("emd,edf->emf", x_ECD, self._weight("w_gate"))
    h = _hidden(self.activation, gate, up)
    y_ECD = jnp.einsum("emf,efd->emd", h, self._weight("w_out"))
    return jnp.swapaxes(y_ECD.reshape(e, g, c, d), 0, 1)

  def grouped(self, x_TD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Grouped experts: rows of x [T, d] sorted by expert, group_sizes[e] rows for expert e.

    Rows past sum(group_sizes) give zeros. The matmuls run `moe.kernels.grouped_matmul.grouped_matmul` with
    `self.grouped_matmul`. SwiGLU's gate and up projections are one [E, d, 2f] grouped matmul: one
    pass over x and one kernel launch instead of two. Its weights are built here, where they are cast
    to the compute dtype anyway, with gate and up interleaved column by column ([E, d, f, 2]), so a
    shard of the f axis (`axes.MLP`) holds the same columns of both and needs no communication.
    """
    x_TD = x_TD.astype(self.dtype)
    matmul = lambda x, w: grouped_matmul(x, w, group_sizes_E, self.grouped_matmul)
    if self.activation is Activation.SWIGLU:
      e, d, f = self.w_in.shape
      w_EDF2 = jnp.stack([self._weight("w_gate"), self._weight("w_in")], axis=-1).reshape(
          e, d, 2 * f
      )
      gate_up_TF2 = matmul(x_TD, w_EDF2).reshape(x_TD.shape[0], f, 2)
      gate, up = gate_up_TF2[..., 0], gate_up_TF2[..., 1]
    else:
      gate, up = None, matmul(x_TD, self._weight("w_in"))
    h = _hidden(self.activation, gate, up)
    return matmul(h, self._weight("w_out"))
