"""The weak-scaling table of docs/parallelism.md: the train step compiled for TPU slices on the CPU.

    python -m experiments.weak_scaling --write_docs     # needs the tpu extra (libtpu); ~1 h on 2 cores

For the base dense model (configs/dense.py:size=base) and its Switch counterparts with E=64 experts
(top-1, top-2), the per-device batch fixed at `--per_device_batch` sequences of 1024 tokens, on 8, 64
and 256 chips of one generation (`--generation`, default v5p), with the meshes a user would pick:
every chip data-parallel (`data`, parameters replicated), fully sharded (`fsdp`), and for the sparse
models 8-way expert parallel inside fully sharded data parallelism (`expert_fsdp`). Each row is one
compile of `experiments.compile_check` with the layers unrolled (`scan_layers=False`: XLA's cost
analysis counts a scanned loop's body once, and one compile then gives memory and cost): memory,
FLOPs and collective bytes per device, and the roofline step time and MFU (`moe.parallel.roofline`). Under weak scaling per-device FLOPs stay flat; the
docs explain each row whose bytes grow with the chip count.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from absl import app, flags

from experiments import compile_check

_GENERATION = flags.DEFINE_enum("generation", "v5p", ["v5e", "v5p", "v6e"], "TPU generation.")
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", 4, "Sequences per chip (the global batch is this times the chip count)."
)
_MODELS = flags.DEFINE_list("models", None, "Only these rows of MODELS (default: all).")
_MESHES = flags.DEFINE_list("meshes", None, "Only these rows of MESHES (default: all).")
_WRITE_DOCS = flags.DEFINE_bool(
    "write_docs", False, "Replace the table in docs/parallelism.md (between its markers)."
)

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "parallelism.md"
BEGIN, END = "<!-- weak-scaling:begin -->", "<!-- weak-scaling:end -->"
# Slice shapes of 8, 64 and 256 chips: 3-D tori for v5p, 2-D for v5e / v6e.
SLICES = {
    "v5p": ((2, 2, 2), (4, 4, 4), (4, 8, 8)),
    "v5e": ((2, 4), (8, 8), (16, 16)),
    "v6e": ((2, 4), (8, 8), (16, 16)),
}
MODELS = {  # name: (config spec, experts, top_k); experts None is the dense model.
    "dense base": ("configs/dense.py:size=base", None, None),
    "switch base E=64 top-1": ("configs/switch.py:size=base", 64, 1),
    "switch base E=64 top-2": ("configs/switch.py:size=base", 64, 2),
}
MESHES = {  # name: (mesh fields, for sparse models only)
    "data": (dict(data=-1, fsdp=1, expert=1, rules="data"), False),
    "fsdp": (dict(data=1, fsdp=-1, expert=1, rules="fsdp"), False),
    "expert=8 x fsdp": (dict(data=1, fsdp=-1, expert=8, rules="expert_fsdp"), True),
}


def experiment(spec: str, experts: int | None, top_k: int | None, mesh: dict, batch: int):
  from moe.config import command_line, config_dict  # pylint: disable=g-import-not-at-top

  cd = command_line.load_config(spec)
  if experts is not None:
    cd.model.moe.num_experts, cd.model.moe.top_k = experts, top_k
    if top_k > 1:  # Rank-major top-2 with a capacity: the causal serving order (docs/routing.md).
      cd.model.moe.serving_order = "token_major"
  cfg = config_dict.experiment_from_config_dict(cd)
  return dataclasses.replace(
      cfg,
      # Unrolled: one compile gives the memory and the cost (compile_check.cost_program).
      model=dataclasses.replace(cfg.model, scan_layers=False),
      mesh=dataclasses.replace(cfg.mesh, **mesh),
      train=dataclasses.replace(cfg.train, global_batch_size=batch),
  )


def row(model: str, mesh_name: str, dims: tuple[int, ...]) -> str:
  """One table row: the step compiled for the slice `dims` of `--generation`."""
  import math  # pylint: disable=g-import-not-at-top

  from moe.parallel import roofline  # pylint: disable=g-import-not-at-top

  spec, experts, top_k = MODELS[model]
  chips, chip = math.prod(dims), roofline.CHIPS[_GENERATION.value]
  cfg = experiment(spec, experts, top_k, MESHES[mesh_name][0], _PER_DEVICE_BATCH.value * chips)
  devices = compile_check.tpu_devices(_GENERATION.value, dims)
  compiled, mesh, _ = compile_check.compile_step(cfg, cfg.mesh, devices)
  memory = compile_check.device_bytes(compiled)
  report = roofline.analyse(
      compile_check.cost_program(cfg, compiled, devices), dict(mesh.shape), chip
  )
  mfu = compile_check.model_flops_per_device(cfg, chips) / (report.step_seconds * chip.peak_flops)
  moved = {op: b for op, b in report.collective_bytes.items() if b}
  return (
      f"| {model} | {mesh_name} | {chips} | {memory['total'] / 2**30:.2f} | "
      f"{report.flops / 1e12:.3f} | "
      + (", ".join(f"{op} {b / 2**20:.0f}" for op, b in moved.items()) or "-")
      + f" | {report.step_seconds * 1e3:.1f} ({report.bound}) | {mfu:.0%} |"
  )


def table() -> str:
  header = (
      "| model | mesh | chips | GiB / chip | TFLOPs / chip | collective MiB / chip | "
      "step ms (bound) | MFU |\n|---|---|---|---|---|---|---|---|"
  )
  lines = [header]
  for model, (_, experts, _) in MODELS.items():
    for mesh_name, (_, sparse_only) in MESHES.items():
      if (sparse_only and experts is None) or not _chosen(model, mesh_name):
        continue
      for dims in SLICES[_GENERATION.value]:
        lines.append(row(model, mesh_name, dims))
        print(lines[-1], flush=True)
  return "\n".join(lines)


def _chosen(model: str, mesh_name: str) -> bool:
  return (not _MODELS.value or model in _MODELS.value) and (
      not _MESHES.value or mesh_name in _MESHES.value
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name, known in ((_MODELS, MODELS), (_MESHES, MESHES)):
    unknown = [v for v in name.value or () if v not in known]
    if unknown:
      raise app.UsageError(f"--{name.name}: {unknown} not among {list(known)}")
  if _WRITE_DOCS.value and (_MODELS.value or _MESHES.value):
    raise app.UsageError("--write_docs writes the whole table: drop --models and --meshes")
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")  # The slices are compiled for, never opened.
  text = table()
  if _WRITE_DOCS.value:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    DOC.write_text(
        re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    )


if __name__ == "__main__":
  app.run(main)
