"""Logical axis names. Model code names these only; `moe.parallel.sharding` maps them to mesh axes by rule table.

Parameters carry them as `nnx.Param(..., out_sharding=(EXPERT, EMBED, MLP))`; activations are
constrained with `moe.parallel.axes.constrain(x, (BATCH, LENGTH, ACT_EMBED))`, a no-op without a mesh and rules.
"""

from __future__ import annotations

import math

from typing import Sequence

import jax
from flax.core import spmd as flax_spmd

# Parameters.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
EXPERT = "expert"
ROUTER_EXPERTS = "router_experts"  # The E outputs of the router: small, never split.
LAYERS = "layers"  # The stacked (scanned) layer axis.
NORM = "norm"

# Activations.
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_MLP = "activation_mlp"
ACT_HEADS = "activation_heads"
ACT_VOCAB = "activation_vocab"
GROUP = "activation_group"  # Routing groups on the token side (split like the batch).
# Routing groups on the expert side (batch split less 'expert').
EXPERT_GROUP = "activation_expert_group"
ACT_EXPERT = "activation_expert"  # The expert axis of dispatched [G, E, C, d] buffers.

ALL = (
    VOCAB,
    EMBED,
    MLP,
    HEADS,
    KV_HEADS,
    HEAD_DIM,
    EXPERT,
    ROUTER_EXPERTS,
    LAYERS,
    NORM,
    BATCH,
    LENGTH,
    ACT_EMBED,
    ACT_MLP,
    ACT_HEADS,
    ACT_VOCAB,
    GROUP,
    EXPERT_GROUP,
    ACT_EXPERT,
)


def logical_to_spec(logical: Sequence[str | None], rules=None) -> jax.P:
  """Maps logical axis names to a mesh PartitionSpec through the active (or given) rule table."""
  rules = dict(flax_spmd.get_logical_axis_rules() if rules is None else rules)
  return jax.P(*(rules.get(name) if name is not None else None for name in logical))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `jax.set_mesh` + `nnx.logical_axis_rules`."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules))


def per_group(fn, *arrays_G: jax.Array):
  """`fn` applied to each device's routing groups: a `jax.shard_map` over the mesh axes of `GROUP`,
  the arrays' leading axis (G); `fn` must treat groups independently. Without a mesh and rules, or
  with fewer groups than devices to split them over (a routing group wider than a device's batch,
  e.g. the whole batch as one group), the plain call: the partitioner then splits what it can.

  For the ops that XLA's SPMD partitioner does not split along their batch axes: on CPU in jax
  0.11.2 `jax.lax.top_k` is a `TopK` custom call, which the partitioner runs on the whole batch
  after gathering it onto every device (issue 19: the router probabilities [G, S, E]).
  """
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return fn(*arrays_G)
  spec = logical_to_spec((GROUP,), rules)
  mesh = jax.sharding.get_abstract_mesh()
  names = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  if any(x.shape[0] % math.prod(mesh.shape[a] for a in names) for x in arrays_G):
    return fn(*arrays_G)
  return jax.shard_map(fn, in_specs=spec, out_specs=spec)(*arrays_G)
