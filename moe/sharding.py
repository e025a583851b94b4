"""Meshes, logical-axis rules and the shardings of the train state and batches (what `pjit` became).

    mesh = make_mesh(MeshConfig(data=2, expert=4, rules="expert"))
    with use_mesh(mesh, rules):            # jax.set_mesh + nnx.logical_axis_rules
      model = Transformer(cfg, rngs=...)   # parameters are created already split by their logical names

Model code names logical axes only (`moe.axes`); one table per strategy maps them to the mesh axes
('data', 'fsdp', 'expert', 'tensor'). Outside the MoE layers the 'expert' axis splits the batch like
'data' does; inside, dispatched buffers [G, E, C, d] are split over 'expert' on E and over
('data', 'fsdp') on G, so the reshard from token-side groups to expert-side buffers is the all-to-all
of expert parallelism. We express it with sharding constraints (`moe.axes.constrain`) and let XLA's SPMD
partitioner emit the all-to-all, rather than a hand-written `jax.shard_map`: the same model code then
runs unchanged on 1 device or any mesh, every dispatch path (einsum, gather) gets expert parallelism for
free, and routing never sees device boundaries, so which tokens drop cannot depend on the mesh.

DROPLESS is the exception: its grouped matmul (`ragged_dot`) cannot be split over experts by the
partitioner, which would gather the expert weights or replicate every claim of the batch on every
device. When the rules split the experts over a mesh axis of size > 1, the layer runs it in a
`jax.shard_map` instead (`moe.expert_parallel`): claims sorted by expert go to their experts' devices
by `all_to_all` and come back; the weights stay where they are. Its results equal the one-device
path's (tests/test_expert_parallel.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import os
from typing import Any

import jax
from flax import nnx

from moe import axes
from moe.validation import as_enum

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # Mesh axes that split the batch outside the MoE layers.


class Rules(enum.Enum):
  """Which parallelism the parameters use. Activations are split the same way in every strategy."""

  DATA = "data"  # Parameters replicated.
  FSDP = "fsdp"  # Parameters split over 'fsdp' on their embed axis (ZeRO-3 style).
  EXPERT = "expert"  # Expert weights split over 'expert' on E; the rest replicated.
  EXPERT_FSDP = "expert_fsdp"  # Experts over 'expert', and every parameter over 'fsdp' on embed.
  EXPERT_TENSOR = "expert_tensor"  # Experts over 'expert'; hidden, heads and vocab over 'tensor'.


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Mesh axis sizes (one of them may be -1: all remaining devices) and the rule table.

  Attributes:
    data, fsdp, expert, tensor: sizes of the mesh axes; their product must be the device count.
    rules: which logical-axis table (`Rules`) maps parameters to the mesh.
  """

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  rules: Rules | str = Rules.DATA

  def __post_init__(self):
    object.__setattr__(self, "rules", as_enum(Rules, self.rules, "mesh.rules"))
    sizes = self.sizes_requested()
    if sum(s == -1 for s in sizes) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, size in zip(MESH_AXES, sizes):
      if not (isinstance(size, int) and (size >= 1 or size == -1)):
        raise ValueError(f"mesh.{name}={size!r} must be an integer >= 1, or -1 (fill)")

  def sizes_requested(self) -> tuple[int, ...]:
    return tuple(getattr(self, name) for name in MESH_AXES)

  def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
    """The four axis sizes for `num_devices`, with -1 filled; raises if they do not fit."""
    sizes = list(self.sizes_requested())
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
            f"mesh {self._show(sizes)} does not fit {num_devices} devices: the fixed axes "
            f"({known} devices) must divide the device count"
        )
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh {self._show(sizes)} needs {math.prod(sizes)} devices, but "
          f"{num_devices} are present; make the product of mesh.data, mesh.fsdp, "
          "mesh.expert and mesh.tensor equal the device count (or set one to -1)"
      )
    return tuple(sizes)

  @staticmethod
  def _show(sizes) -> str:
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes)) + ")"


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes (data, fsdp, expert, tensor), all Auto-typed
  (the SPMD partitioner propagates shardings between our constraints)."""
  cfg = cfg or MeshConfig()
  devices = jax.devices() if devices is None else devices
  sizes = cfg.axis_sizes(len(devices))
  return jax.make_mesh(
      sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes), devices=devices
  )


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


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: bool = False,
) -> bool:
  """Starts multi-host JAX (`jax.distributed.initialize`) when there is more than one process.

  With no arguments, JAX detects TPU pods and SLURM/Open MPI GPU clusters from the environment
  (`JAX_COORDINATOR_ADDRESS`, `SLURM_*`, ...); on a plain single machine with none of those this is a
  no-op. Explicit arguments (the `--coordinator_address`, `--num_processes`, `--process_id` flags of
  `experiments.train`) override detection. `cpu_collectives` turns on gloo collectives so several CPU
  processes can run one job (tests, laptops). Returns whether multi-process mode was started.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  cluster_env = any(
      k in os.environ
      for k in (
          "JAX_COORDINATOR_ADDRESS",
          "SLURM_JOB_ID",
          "OMPI_COMM_WORLD_SIZE",
          "TPU_WORKER_HOSTNAMES",
          "MEGASCALE_COORDINATOR_ADDRESS",
      )
  )
  if not explicit and not cluster_env:
    return False
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return jax.process_count() > 1
