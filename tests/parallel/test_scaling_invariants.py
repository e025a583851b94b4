"""Scaling invariants of the compiled train step on 8 fake CPU devices: each device computes 1/N of
the one-device step, and no collective but the token all-to-alls moves an array of the global batch.

Cost is read from the compiled program (`steps.make_train_step(...).lower(state, batch).compile()`),
never from timing: `cost_analysis()["flops"]` per device, and the collectives (all-gather, all-reduce,
reduce-scatter, collective-permute, all-to-all) with their shapes parsed from `as_text()`.

    python tests/parallel/test_scaling_invariants.py   # prints the table the tests check

For the dense model and every dispatch path x {top-1, top-2, experts choose} (DROPLESS is tokens
choose only), on the meshes a user would pick for 8 devices. Before the fix of issue 19 the table
read, on data=8 (global batch 64 x 16, E=8, d=16, both layers sparse; FLOPs per device x 8 over the
one-device step's):

    einsum   top-1: 1.07   all-gather f32[64,16,8] (the router probabilities [B, L, E], at the softmax)
    dropless top-1: 5.94   all-gather f32[64,16,8], all-gather s32[1024] (every claim of the batch),
                           all-reduce f32[1024,16] twice (every claim's output, forward and backward)

so both `test_flops_per_device_shrink_with_the_mesh` (dropless: 46.7M per device against 63.4M on one)
and `test_no_collective_of_the_global_batch` (every sparse path) failed.
"""

from __future__ import annotations

import functools
import re
import sys

import jax
import pytest

from moe.config.experiment import ExperimentConfig
from moe.config.mesh import BATCH_AXES, MESH_AXES
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig
from moe.data import DataConfig
from moe.parallel import sharding
from moe.trainer import steps

B, L = 64, 16  # The global batch; T = B * L tokens.
T = B * L
E, D, F = 8, 16, 24
# Sizes chosen so that no parameter (nor a stack of two) has T elements or a leading run of
# dimensions whose product is a multiple of T: such a parameter would read as a batch-sized array.
VOCAB, MLP_HIDDEN = 40, 48

# A path: (dispatch, router, top_k), None for the dense model.
PATHS = {
    "dense": None,
    "einsum_top1": ("einsum", "tokens_choose", 1),
    "einsum_top2": ("einsum", "tokens_choose", 2),
    "einsum_experts_choose": ("einsum", "experts_choose", 1),
    "gather_top1": ("gather", "tokens_choose", 1),
    "gather_top2": ("gather", "tokens_choose", 2),
    "gather_experts_choose": ("gather", "experts_choose", 1),
    "dropless_top1": ("dropless", "tokens_choose", 1),
    "dropless_top2": ("dropless", "tokens_choose", 2),
}
MESHES = {
    "data8": sharding.MeshConfig(data=8),
    "fsdp8": sharding.MeshConfig(data=1, fsdp=8, rules="fsdp"),
    "data2_expert4": sharding.MeshConfig(data=2, expert=4, rules="expert"),
    "fsdp2_expert2_tensor2": sharding.MeshConfig(
        data=1, fsdp=2, expert=2, tensor=2, rules="expert_tensor"
    ),
}
# Per-device FLOPs x N over the one-device step's FLOPs. What the upper bound allows for: the
# optimiser update of parameters that the rules replicate (computed on every device, a few FLOPs
# per parameter), collectives' own reductions, and the per-device routing bookkeeping (sorts,
# cumsums) that does not shrink exactly, the tensor-parallel partial sums, and the 4% by which the
# one-device reference (the lowered program) differs from a compiled one. Padded all-to-all buffers
# of expert-parallel DROPLESS (moe/layers/expert_parallel.py: the grouped matmul gets n * J rows for
# J claims) do not show in `cost_analysis` on CPU (1.07 on data=2 x expert=4). Measured here:
# at most 1.21 (einsum, fsdp=2 x expert=2 x tensor=2), at most 1.08 on data=8.
FLOPS_TOLERANCE = 1.3
# LLVM's optimisations only: the partitioned HLO, its FLOPs and its collectives are the same, and a
# compile takes about half the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def experiment(path: str, mesh: sharding.MeshConfig) -> ExperimentConfig:
  moe = None
  if PATHS[path] is not None:
    dispatch, router, top_k = PATHS[path]
    capacity = (None, None) if dispatch == "dropless" else (1.25, 2.0)
    moe = MoEConfig(
        num_experts=E,
        top_k=top_k,
        expert_hidden=F,
        dispatch=dispatch,
        router=router,
        train_capacity_factor=capacity[0],
        eval_capacity_factor=capacity[1],
        allow_noncausal_routing=True,
    )
  model = ModelConfig(
      vocab_size=VOCAB,
      d_model=D,
      num_layers=2,
      num_heads=2,
      mlp_hidden=MLP_HIDDEN,
      moe=moe,
      sparse_every=1,
      max_len=L,
  )
  train = TrainConfig(steps=2, global_batch_size=B, seq_len=L, warmup_steps=1)
  return ExperimentConfig(name=path, model=model, train=train, data=DataConfig(), mesh=mesh)


@functools.cache
def compiled_step(path: str, mesh_name: str | None):
  """(per-device FLOPs, HLO text, parameter shapes) of the train step; mesh None is one device.

  One device's FLOPs are the lowered program's (`Lowered.cost_analysis`, before XLA's passes): no
  compile, and within 4% of the compiled one-device step here (fusion and simplification)."""
  mesh_cfg = sharding.MeshConfig(data=1) if mesh_name is None else MESHES[mesh_name]
  devices = jax.devices()[: 1 if mesh_name is None else 8]
  cfg = experiment(path, mesh_cfg)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = sharding.logical_rules(mesh_cfg.rules)
  graphdef, rest, tx, state, state_sharding = steps.init_train_state(
      cfg, mesh, rules, abstract=True
  )
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {
      key: jax.ShapeDtypeStruct((B, L), dtype, sharding=batch_sharding)
      for key, dtype in (("inputs", "int32"), ("targets", "int32"), ("weights", "float32"))
  }
  with sharding.use_mesh(mesh, rules):
    step = steps.make_train_step(
        graphdef, rest, cfg, tx, state_sharding=state_sharding, batch_sharding=batch_sharding
    )
    lowered = step.lower(state, batch)
    if mesh_name is None:
      return lowered.cost_analysis()["flops"], None, None
    compiled = lowered.compile(compiler_options=FAST_COMPILE)
  return compiled.cost_analysis()["flops"], compiled.as_text(), parameter_shapes(state.params)


def parameter_shapes(params) -> set[tuple[int, ...]]:
  """Every parameter's shape, its per-device shard's, and both without a stacked-layer axis (the
  scanned step reduces one layer's gradient at a time)."""
  shapes = set()
  for leaf in jax.tree.leaves(params):
    for shape in (leaf.shape, leaf.sharding.shard_shape(leaf.shape)):
      shapes.update({tuple(shape), tuple(shape[1:])})
  return shapes


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...], frozenset[str]]]:
  """(op, shape, mesh axes it runs over) for every array a collective returns or takes in compiled
  HLO text; a tuple (combined all-reduces, CPU all-to-alls split per peer) gives one entry per
  element. Operands are named, not typed, in compiled HLO: their shapes come from the instructions
  that define them. The axes come from `replica_groups=mesh[...] {'data', ...}`; a collective
  written with explicit device groups is taken to run over every axis."""
  instruction = re.compile(r"\s*(?:ROOT )?(%\S+) = (.*?) ([\w-]+)\((.*?)\)")
  shape_of = lambda text: [
      tuple(int(v) for v in dims.split(",") if v) for dims in re.findall(r"\w+\[([\d,]*)\]", text)
  ]
  defined, found = {}, []
  for line in hlo.splitlines():
    match = instruction.match(line)
    if not match:
      continue
    name, result, op, operands = match.groups()
    defined[name] = shape_of(result)
    op = op.removesuffix("-start")
    if op not in COLLECTIVES:
      continue
    groups = re.search(r"replica_groups=mesh\[[^\]]*\] \{([^}]*)\}", line)
    mesh_axes = frozenset(re.findall(r"'(\w+)'", groups.group(1)) if groups else MESH_AXES)
    shapes = shape_of(result)
    for operand in re.findall(r"%[\w.-]+", operands):
      shapes += defined.get(operand, [])
    found += [(op, shape, mesh_axes) for shape in shapes]
  return found


def spans_the_global_batch(shape: tuple[int, ...]) -> bool:
  """Whether an array holds the global batch: a dimension of B rows (or of B routing groups: a group
  per sequence here), of T tokens or of 2 T claims ([T], [k * T, d])."""
  return any(n in (B, T, 2 * T) for n in shape)


def batch_sized(hlo: str, param_shapes=frozenset()) -> list[tuple[str, tuple[int, ...]]]:
  """Collectives other than the token all-to-alls that move, over a mesh axis that splits the batch,
  an array of the global batch's size and not the shape of a parameter (parameter and gradient
  collectives are expected under fsdp). Over 'tensor' alone, a collective moves the device's own
  tokens' partial sums (Megatron-style), which shrink with the batch axes."""
  return [
      (op, shape)
      for op, shape, mesh_axes in collectives(hlo)
      if op != "all-to-all"
      and mesh_axes & set(BATCH_AXES)
      and spans_the_global_batch(shape)
      and shape not in param_shapes
  ]


def batch_sized_collectives(path: str, mesh_name: str) -> list[tuple[str, tuple[int, ...]]]:
  _, hlo, param_shapes = compiled_step(path, mesh_name)
  return batch_sized(hlo, param_shapes)


def flops_ratio(path: str, mesh_name: str) -> float:
  """Per-device FLOPs x N over the one-device step's FLOPs: 1.0 when each device does 1/N."""
  return compiled_step(path, mesh_name)[0] * 8 / compiled_step(path, None)[0]


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("path", PATHS)
def test_flops_per_device_shrink_with_the_mesh(path, mesh_name):
  ratio, tolerance = flops_ratio(path, mesh_name), FLOPS_TOLERANCE
  per_device, one_device = compiled_step(path, mesh_name)[0], compiled_step(path, None)[0]
  assert 1 / FLOPS_TOLERANCE <= ratio <= tolerance, (
      f"{path} on {mesh_name}: {per_device / 1e6:.2f}M FLOPs per device x 8 = {ratio:.2f} x the "
      f"one-device step's {one_device / 1e6:.2f}M (allowed: up to {tolerance})"
  )


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("path", PATHS)
def test_no_collective_of_the_global_batch(path, mesh_name):
  leaks = batch_sized_collectives(path, mesh_name)
  assert not leaks, f"{path} on {mesh_name}: " + "; ".join(f"{op} {s}" for op, s in leaks)


def test_the_collective_check_can_fail():
  """The rule flags the gathers of issue 19 (lines as they appeared in the compiled HLO of data=8)
  and a reduce-scatter of a batch-sized operand; it passes a gradient all-reduce, an all-reduce over
  'tensor' alone and the token all-to-all."""
  groups = "replica_groups=mesh['data'=8,'fsdp'=1,'expert'=1,'tensor'=1]"
  hlo = f"""
  %div = f32[8,16,8]{{2,1,0}} fusion(%x), kind=kLoop
  %all-gather.1 = f32[64,16,8]{{2,1,0}} all-gather(%div), {groups} {{'data'}}, dimensions={{0}}
  %all-reduce.2 = (f32[1024,16]{{1,0}}, f32[]) all-reduce(%a, %b), {groups} {{'data'}}
  %all-reduce.3 = f32[2,16,48]{{2,1,0}} all-reduce(%g), {groups} {{'data'}}, to_apply=%add
  %all-reduce.4 = f32[16,16,16]{{2,1,0}} all-reduce(%h), {groups} {{'tensor'}}, to_apply=%add
  %big = f32[1024,16]{{1,0}} fusion(%y), kind=kLoop
  %reduce-scatter.5 = f32[128,16]{{1,0}} reduce-scatter(%big), {groups} {{'data'}}
  %all-to-all.6 = f32[1024,16]{{1,0}} all-to-all(%big), {groups} {{'data'}}
  """
  assert batch_sized(hlo, {(2, 16, 48)}) == [
      ("all-gather", (64, 16, 8)),
      ("all-reduce", (1024, 16)),
      ("reduce-scatter", (1024, 16)),
  ]


def main():
  """Prints FLOPs ratios and batch-sized collectives for every path and mesh."""
  for path in PATHS:
    for mesh_name in MESHES:
      leaks = sorted({f"{op} {list(s)}" for op, s in batch_sized_collectives(path, mesh_name)})
      print(
          f"{path:>22} {mesh_name:>22} flops/dev {compiled_step(path, mesh_name)[0] / 1e6:7.2f}M "
          f"(1 dev {compiled_step(path, None)[0] / 1e6:7.2f}M) x8/1: {flops_ratio(path, mesh_name):5.2f}"
          f"  {', '.join(leaks) or '-'}",
          flush=True,
      )


if __name__ == "__main__":
  sys.exit(main())
