"""Meshes, logical-axis rules and the shardings of the train state and batches (what `pjit` became).

    mesh = make_mesh(MeshConfig(data=2, expert=4, rules="expert"))
    with use_mesh(mesh, rules):            # jax.set_mesh + nnx.logical_axis_rules
      model = Transformer(cfg, rngs=...)   # parameters are created already split by their logical names

Model code names logical axes only (`moe.parallel.axes`); one table per strategy maps them to the mesh axes
('data', 'fsdp', 'expert', 'tensor'). Outside the MoE layers the 'expert' axis splits the batch like
'data' does; inside, dispatched buffers [G, E, C, d] are split over 'expert' on E and over
('data', 'fsdp') on G, so the reshard from token-side groups to expert-side buffers is the all-to-all
of expert parallelism. We express it with sharding constraints (`moe.parallel.axes.constrain`) and let XLA's SPMD
partitioner emit the all-to-all, rather than a hand-written `jax.shard_map`: the same model code then
runs unchanged on 1 device or any mesh, every dispatch path (einsum, gather) gets expert parallelism for
free, and routing never sees device boundaries, so which tokens drop cannot depend on the mesh.

Two exceptions, both because the partitioner runs an op on the whole batch when it cannot split it:
`jax.lax.top_k` (a `TopK` custom call on CPU) runs per device in a `jax.shard_map` over the groups
(`moe.parallel.axes.per_group`), and DROPLESS, whose global sort of claims and grouped matmul
(`ragged_dot`) the partitioner would replicate on every device (or answer by gathering the expert
weights), runs in a `jax.shard_map` under any mesh (`moe.layers.expert_parallel`): each device sorts
its own claims; when the rules split the experts over a mesh axis of size > 1, the claims go to their
experts' devices by `all_to_all` and come back, and the weights stay where they are. Results equal
the one-device path's (tests/layers/test_expert_parallel.py); the compiled cost is checked in
tests/parallel/test_scaling_invariants.py.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import jax
from jax.experimental import mesh_utils
from flax import nnx

from moe.config.mesh import BATCH_AXES, MESH_AXES, MeshConfig, Rules
from moe.config.validation import as_enum
from moe.parallel import axes

_ACTIVATIONS = (
    (axes.BATCH, BATCH_AXES),
    (axes.GROUP, BATCH_AXES),
    (axes.EXPERT_GROUP, ("data", "fsdp")),
    (axes.ACT_EXPERT, "expert"),
    (axes.LENGTH, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_MLP, "tensor"),
    (axes.ACT_HEADS, "tensor"),
    (axes.ACT_VOCAB, "tensor"),
)
_PARAMS = {
    Rules.DATA: {},
    Rules.FSDP: {axes.EMBED: "fsdp"},
    Rules.EXPERT: {axes.EXPERT: "expert"},
    Rules.EXPERT_FSDP: {axes.EXPERT: "expert", axes.EMBED: "fsdp"},
    # K/V projections stay whole: grouped-query models often have fewer kv heads than tensor shards,
    # and the K/V projections are small.
    Rules.EXPERT_TENSOR: {
        axes.EXPERT: "expert",
        axes.MLP: "tensor",
        axes.HEADS: "tensor",
        axes.VOCAB: "tensor",
    },
}


def logical_rules(rules: Rules | str) -> tuple[tuple[str, Any], ...]:
  """The full table (every logical name, parameters then activations) for one strategy."""
  rules = as_enum(Rules, rules, "mesh.rules")
  params = _PARAMS[rules]
  param_names = (
      axes.VOCAB,
      axes.EMBED,
      axes.MLP,
      axes.HEADS,
      axes.KV_HEADS,
      axes.HEAD_DIM,
      axes.EXPERT,
      axes.ROUTER_EXPERTS,
      axes.LAYERS,
      axes.NORM,
  )
  return tuple((name, params.get(name)) for name in param_names) + _ACTIVATIONS


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes (data, fsdp, expert, tensor), all Auto-typed
  (the SPMD partitioner propagates shardings between our constraints)."""
  cfg = cfg or MeshConfig()
  devices = jax.devices() if devices is None else devices
  sizes = cfg.axis_sizes(len(devices))
  types = (jax.sharding.AxisType.Auto,) * len(sizes)
  try:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=types, devices=devices)
  except NotImplementedError:
    # A mesh axis that is no product of whole torus axes (expert=8 x fsdp=8 on a 4x4x4 v5p slice):
    # jax.make_mesh splits physical axes only on v5e; split them here too, as MaxText does.
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=types)


def check_divisibility(
    mesh: jax.sharding.Mesh,
    mesh_cfg: MeshConfig,
    model_cfg,
    global_batch_size: int,
    seq_len: int | None = None,
) -> None:
  """Raises, before anything compiles, when the batch or the model does not split over the mesh.

  Checks every dimension that a parameter rule or an activation rule splits: the batch and the routing
  groups over the batch axes, experts over 'expert', and under the tensor rules heads, vocabulary and
  hidden widths over 'tensor'. A 'tensor' axis > 1 is refused unless the rules use it (it would
  duplicate the work of every tensor slice).
  """
  shape = dict(mesh.shape)
  batch_split = math.prod(shape[a] for a in BATCH_AXES)
  if global_batch_size % batch_split:
    raise ValueError(
        f"train.global_batch_size={global_batch_size} must be divisible by the data-parallel size "
        f"{batch_split} (mesh data x fsdp x expert = {shape['data']} x {shape['fsdp']} x "
        f"{shape['expert']})"
    )
  moe = model_cfg.moe
  if moe is not None and seq_len is not None and model_cfg.num_sparse_layers:
    groups, _ = moe.group_shape(global_batch_size, seq_len)
    if groups % batch_split:
      raise ValueError(
          f"model.moe.group_size={moe.group_size} gives {groups} routing groups per batch, which must "
          f"be divisible by the data-parallel size {batch_split}; use a smaller group size"
      )
  if moe is not None and model_cfg.num_sparse_layers and moe.num_experts % shape["expert"]:
    raise ValueError(
        f"model.moe.num_experts={moe.num_experts} must be divisible by the expert axis "
        f"(mesh.expert={shape['expert']})"
    )
  table = dict(logical_rules(mesh_cfg.rules))
  if shape["tensor"] > 1 and "tensor" not in _PARAMS[mesh_cfg.rules].values():
    raise ValueError(
        f"mesh.tensor={shape['tensor']} needs rules that split over it "
        f"(mesh.rules='expert_tensor'), not mesh.rules={mesh_cfg.rules.value!r}"
    )
  widths = {
      axes.EMBED: [("model.d_model", model_cfg.d_model)],
      axes.MLP: [("model.mlp_hidden", model_cfg.mlp_hidden)],
      axes.HEADS: [("model.num_heads", model_cfg.num_heads)],
      axes.KV_HEADS: [("model.num_kv_heads", model_cfg.num_kv_heads)],
      axes.VOCAB: [("model.vocab_size", model_cfg.vocab_size)],
  }
  if moe is not None:
    widths[axes.MLP].append(("model.moe.expert_hidden", moe.expert_hidden))
    if moe.shared_expert_hidden:
      widths[axes.MLP].append(("model.moe.shared_expert_hidden", moe.shared_expert_hidden))
  for logical, fields in widths.items():
    mesh_axis = table.get(logical)
    for field, value in fields if mesh_axis is not None else ():
      if value % shape[mesh_axis]:
        raise ValueError(
            f"{field}={value} must be divisible by mesh.{mesh_axis}={shape[mesh_axis]} "
            f"(mesh.rules={mesh_cfg.rules.value} splits it there)"
        )


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules):
  """Sets the mesh and the logical rules: models built inside are created already split."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def named_shardings(tree, mesh: jax.sharding.Mesh, rules):
  """NamedShardings of an nnx.State (or any tree of Variables) from their logical names."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(tree)
  return jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, jax.P)
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """[batch, length] arrays: batch over (data, fsdp, expert)."""
  return jax.sharding.NamedSharding(mesh, jax.P(BATCH_AXES, None))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P())
