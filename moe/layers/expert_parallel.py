"""Dropless MoE under expert parallelism: tokens travel to the devices that hold their experts.

    if expert_parallel.expert_axis() is not None:   # a mesh axis of size > 1 splits the experts
      y_GSD, kept_GSK = expert_parallel.dropless_moe(x_GSD, expert_GSK, gates_GSK, experts, E)

`moe.layers.dispatch.dropless_moe` under a mesh leaves the partitioner to split `jax.lax.ragged_dot` over
weights [E, d, f] split over 'expert'. It cannot move claims between devices by expert, so it either
all-gathers the weights or, as jax 0.11.2 does on 8 CPU devices (tests/layers/
test_expert_parallel.py), replicates every claim of the global batch on every device and all-reduces
the experts' partial outputs: memory and work per device grow with E or with the global batch. Here
a `jax.shard_map` over the whole mesh keeps each device's E / n experts (n = size of the expert
axis) and its own tokens, and sends each claim to its expert's device only (GShard Sec. 3.2;
megablocks and MaxText's dropless path do the same):

1. each device sorts its claims (token, rank) by expert; experts [i E/n, (i+1) E/n) live on expert
   index i, so the sorted claims are also grouped by destination;
2. the rows go to their destinations with `jax.lax.all_to_all` (and the per-expert counts with them);
3. the receiver groups what it got by local expert and runs the experts' grouped matmul on them;
4. the results come back the reverse way, are un-permuted and combined with the gates.

Collective: `jax.lax.ragged_all_to_all` would send only the claims, but XLA:CPU does not implement
it in jax 0.11.2 ("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), so the
exchange is a dense `all_to_all` of per-destination buffers padded to the static worst case: all J =
T_local * k claims of a device may go to one destination, so the send and receive buffers are
[n, J, d] each, and the grouped matmul gets n * J rows of which J on average hold claims (the rows
past the sum of the group sizes are padding: `ragged_dot` gives zeros there, discarded; whether they
cost work depends on the kernel). That is n times the activation memory of the claims; a bounded
buffer would drop tokens, which dropless must not. `ragged_all_to_all` (which has a transpose rule)
would still need a worst-case receive buffer, but no padded send buffer and no padded rows on the
wire.

Tensor parallelism: where the rules split the experts' hidden axis (MLP) over a mesh axis, each slice
computes a partial output from its hidden slice and the slices are summed (`psum`, Megatron-style).
Parameters split on other axes (e.g. embed over 'fsdp') are gathered for the call, as ZeRO-3 does.
Gradients flow through `shard_map` and `all_to_all` (whose transpose is the reverse all-to-all).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

from moe.layers import dispatch
from moe.parallel import axes


def _mesh_axes(logical: str) -> tuple[str, ...]:
  """Mesh axes the active rules map one logical name to (empty: not split)."""
  spec = axes.logical_to_spec((logical,))[0]
  if spec is None:
    return ()
  return (spec,) if isinstance(spec, str) else tuple(spec)


def under_mesh() -> bool:
  """Whether a mesh (`jax.set_mesh`) and logical rules are active: the layer is being partitioned."""
  return not jax.sharding.get_abstract_mesh().empty and bool(flax_spmd.get_logical_axis_rules())


def expert_axis() -> str | None:
  """The mesh axis the experts' weights are split over, when the current mesh (`jax.set_mesh`) and
  logical rules split them over an axis of size > 1; None otherwise (one device, or replicated
  experts)."""
  if not under_mesh():
    return None
  mesh = jax.sharding.get_abstract_mesh()
  split = [a for a in _mesh_axes(axes.EXPERT) if mesh.shape[a] > 1]
  if len(split) > 1:
    raise ValueError(f"expert weights split over several mesh axes {split}: expected one")
  return split[0] if split else None


def _local_param_specs(params: nnx.State) -> nnx.State:
  """PartitionSpecs of the experts' parameters inside the shard_map: E over its mesh axis, the hidden
  axis over its (tensor) axis if any, everything else whole (gathered, as FSDP does).

  Mesh axes of size 1 are left out: they split nothing, but shard_map would count the parameters as
  varying over them, and the output (replicated over them) would fail its replication check."""
  mesh = jax.sharding.get_abstract_mesh()

  def split(logical: str):
    names = tuple(a for a in _mesh_axes(logical) if mesh.shape[a] > 1)
    return names[0] if len(names) == 1 else (names or None)

  kept = {axes.EXPERT, axes.MLP}
  rules = flax_spmd.get_logical_axis_rules()
  local_rules = tuple((name, split(name) if name in kept else None) for name, _ in rules)
  with nnx.logical_axis_rules(local_rules):
    return nnx.get_partition_spec(params)


def dropless_moe(x_GSD, expert_index_GSK, gates_GSK, experts: nnx.Module, num_experts: int):
  """Every claim computed, on the devices that hold its expert; the expert weights never move.

  Call under `jax.set_mesh` and `nnx.logical_axis_rules` (`under_mesh()`). Without an expert split
  (`expert_axis()` None) there is nothing to exchange: each device sorts and multiplies its own
  tokens' claims with every expert (`moe.layers.dispatch.dropless_moe` on its shard). Left to the
  partitioner, that path's global argsort gathered every claim of the batch onto every device and
  computed them all there (issue 19: 6 x the one-device FLOPs on data=8).

  Args:
    x_GSD: tokens in routing groups [G, S, d] (the groups are flattened: dropless routing is
      per token).
    expert_index_GSK: expert of each claim [G, S, k]; gates_GSK: its combine weight [G, S, k].
    experts: the expert bank: parameters with logical names, expert axis first, and a method
      `grouped(x_TD, group_sizes_E) -> y_TD` that runs the experts it holds on expert-sorted rows.
      Inside the shard_map it is rebuilt holding only the device's E / n experts, so its grouped
      matmul (whichever implementation it uses) runs on the local experts.
    num_experts: E.

  Returns:
    (y [G, S, d], kept [G, S, k] all True), as `moe.layers.dispatch.dropless_moe`.
  """
  g, s, d = x_GSD.shape
  k = expert_index_GSK.shape[-1]
  mesh = jax.sharding.get_abstract_mesh()
  axis = expert_axis()
  n = 1 if axis is None else mesh.shape[axis]
  if num_experts % n:
    raise ValueError(f"moe.num_experts={num_experts} must be divisible by the expert axis ({n})")
  token_axes = tuple(a for a in _mesh_axes(axes.GROUP) if mesh.shape[a] > 1)
  token_split = math.prod(mesh.shape[a] for a in token_axes)
  if (g * s) % token_split:
    raise ValueError(
        f"dropless expert parallelism: {g * s} tokens do not split over the batch mesh axes "
        f"{token_axes} ({token_split} devices); make the batch divisible by them"
    )
  sum_axes = tuple(a for a in _mesh_axes(axes.MLP) if mesh.shape[a] > 1)
  graphdef, params = nnx.split(experts)

  def local(x_TD, expert_TK, gates_TK, local_params):
    grouped = lambda x, sizes: nnx.merge(graphdef, local_params).grouped(x, sizes)
    if axis is None:
      y_1TD, _ = dispatch.dropless_moe(
          x_TD[None], expert_TK[None], gates_TK[None], grouped, num_experts
      )
      return jax.lax.psum(y_1TD[0], sum_axes) if sum_axes else y_1TD[0]
    return _local_dropless(x_TD, expert_TK, gates_TK, grouped, num_experts, axis, sum_axes)

  tokens = jax.P(token_axes or None)
  y_TD = jax.shard_map(
      local,
      in_specs=(tokens, tokens, tokens, _local_param_specs(params)),
      out_specs=tokens,
  )(
      x_GSD.reshape(g * s, d),
      expert_index_GSK.reshape(g * s, k),
      gates_GSK.reshape(g * s, k),
      params,
  )
  return y_TD.reshape(g, s, d), jnp.ones(expert_index_GSK.shape, bool)


def _local_dropless(x_TD, expert_TK, gates_TK, grouped, num_experts: int, axis: str, sum_axes):
  """One device's part: its T tokens' claims out to the experts' devices, computed, and back."""
  t, d = x_TD.shape
  k = expert_TK.shape[-1]
  n = jax.lax.axis_size(axis)
  expert_J = expert_TK.reshape(-1)  # Claim j = (token j // k, rank j % k).
  j = expert_J.shape[0]
  perm_J = jnp.argsort(expert_J, stable=True)
  counts_ZX = jnp.bincount(expert_J, length=num_experts).astype(jnp.int32).reshape(n, -1)
  dest_J = expert_J[perm_J] // counts_ZX.shape[1]  # Destination of each sorted claim.
  row_J, token_ZJ = _send_rows(perm_J // k, dest_J, counts_ZX.sum(axis=1), filler=t)

  x_pad_TD = jnp.concatenate([x_TD, jnp.zeros((1, d), x_TD.dtype)])
  recv_ZJD = jax.lax.all_to_all(x_pad_TD[token_ZJ], axis, 0, 0)  # recv[i]: rows from device i.
  recv_counts_ZX = jax.lax.all_to_all(counts_ZX, axis, 0, 0)  # Per sender, per local expert.

  order_R, group_sizes_X = _group_by_local_expert(recv_counts_ZX, j)
  y_R = grouped(recv_ZJD.reshape(n * j, d)[order_R], group_sizes_X).astype(x_TD.dtype)
  if sum_axes:  # Each tensor slice holds part of the hidden axis: its output is a partial sum.
    y_R = jax.lax.psum(y_R, sum_axes)
  y_recv_ZJD = jnp.zeros_like(y_R).at[order_R].set(y_R).reshape(n, j, d)
  y_back_RD = jax.lax.all_to_all(y_recv_ZJD, axis, 0, 0).reshape(n * j, d)  # Back to the senders.

  y_sorted_JD = y_back_RD[row_J]
  y_JD = jnp.zeros_like(y_sorted_JD).at[perm_J].set(y_sorted_JD)
  return jnp.einsum("tk,tkd->td", gates_TK.astype(x_TD.dtype), y_JD.reshape(t, k, d))


def _send_rows(token_J, dest_J, sent_Z, filler: int):
  """The padded per-destination send buffer [n, J] for claims sorted by expert.

  Destination i gets sorted claims starts[i] ... starts[i] + sent[i] - 1 in its first sent[i] rows,
  in expert order; its other rows are padding.

  Args:
    token_J: token of each sorted claim; dest_J: its destination (non-decreasing).
    sent_Z: claims per destination; filler: the token index that reads as a zero row.

  Returns:
    (row_J: flat row dest * J + offset of each sorted claim; token_ZJ: the token in each row).
  """
  j = token_J.shape[0]
  starts_Z = jnp.cumsum(sent_Z) - sent_Z
  offset_J = jnp.arange(j, dtype=jnp.int32)
  row_J = dest_J * j + offset_J - starts_Z[dest_J]
  source_ZJ = starts_Z[:, None] + offset_J[None, :]  # The sorted claim that fills each row.
  used_ZJ = offset_J[None, :] < sent_Z[:, None]
  token_ZJ = jnp.where(used_ZJ, token_J[jnp.minimum(source_ZJ, j - 1)], filler)
  return row_J, token_ZJ


def _group_by_local_expert(recv_counts_ZX, j: int):
  """Order that sorts received rows [n * J] by local expert, and the group sizes [L].

  Device i's J rows hold recv_counts[i, 0] rows for local expert 0, then recv_counts[i, 1] for
  expert 1, ..., then padding, which sorts last (past the groups: the grouped matmul skips it).
  """
  ends_ZX = jnp.cumsum(recv_counts_ZX, axis=1)
  offset_J = jnp.arange(j, dtype=jnp.int32)
  expert_ZJ = jax.vmap(lambda ends: jnp.searchsorted(ends, offset_J, side="right"))(ends_ZX)
  order_R = jnp.argsort(expert_ZJ.reshape(-1), stable=True)
  return order_R, recv_counts_ZX.sum(axis=0)
