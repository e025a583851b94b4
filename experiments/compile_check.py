"""Lowers and compiles the train step for a mesh without running it; prints its cost per device.

    python -m experiments.compile_check --config=configs/switch.py:size=large \
        --mesh=data=2,expert=4,rules=expert_fsdp --fake_devices=8
    python -m experiments.compile_check --config=configs/dense.py:size=base \
        --topology=v5p:4x8x8 --mesh=fsdp=-1,rules=fsdp        # needs the tpu extra (libtpu)

Catches an out-of-memory (and any sharding error) before a launch, as MaxText's train_compile does.
Nothing is allocated or run: the train state is abstract (shapes, dtypes and shardings). With
`--fake_devices=N` the step is compiled for N fake CPU devices (CPU temporaries differ somewhat from
an accelerator's; parameters and optimiser state are exact). With `--topology=GEN:AxB[xC]` (v5e, v5p,
v6e) it is compiled by libtpu for that TPU slice, on this machine's CPU
(`jax.experimental.topologies.get_topology_desc`): the memory, FLOPs and collectives are the TPU
program's. `--mesh` takes the fields of moe.parallel.sharding.MeshConfig (data, fsdp, expert, tensor,
rules) and overrides the config's mesh section; `--global_batch_size` overrides the config's.

Printed per device: memory (arguments, outputs, temporaries; fits or not), FLOPs, bytes per kind of
collective, and on a topology a roofline step time (`moe.parallel.roofline`) with the MFU it implies.
With `scan_layers` (the default) the FLOPs and collectives come from the step compiled a second
time with its layers unrolled: XLA's cost analysis counts a loop's body once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (path[:arg]).", lock_config=True
)
_MESH = flags.DEFINE_string("mesh", None, "Mesh fields, e.g. 'data=2,expert=4,rules=expert'.")
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_devices", 0, "Compile for this many fake CPU devices (0: the real devices)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Compile for a TPU slice on the CPU, e.g. 'v5p:4x8x8', 'v5e:2x2' (libtpu)."
)
_BATCH = flags.DEFINE_integer("global_batch_size", None, "Override train.global_batch_size.")
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    "device_memory_gb", None, "Memory per device to check against (default: as reported)."
)


def parse_mesh(text: str) -> dict:
  fields = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--mesh: expected key=value, got {item!r}")
    fields[key.strip()] = value.strip() if key.strip() == "rules" else int(value)
  return fields


def parse_topology(text: str):
  """('v5p', (4, 8, 8)) from 'v5p:4x8x8'; SystemExit with one line for a name we cannot build."""
  from moe.parallel import roofline  # pylint: disable=g-import-not-at-top

  match = re.fullmatch(r"(\w+):(\d+(?:x\d+){1,2})", text)
  if not match or match.group(1) not in roofline.CHIPS:
    raise SystemExit(
        f"compile_check: unknown topology {text!r}: expected GEN:AxB or GEN:AxBxC with GEN one of "
        f"{', '.join(roofline.CHIPS)} (e.g. v5e:2x2, v5p:4x8x8)"
    )
  return match.group(1), tuple(int(n) for n in match.group(2).split("x"))


def tpu_devices(generation: str, dims: tuple[int, ...]):
  """The devices of a TPU slice, built on the CPU by libtpu (nothing runs on them)."""
  from moe.parallel import roofline  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec("libtpu") is None:
    raise SystemExit(
        "compile_check: --topology needs libtpu, which is not installed: pip install -e '.[tpu]' "
        "(into its own virtualenv: it is about 700 MB)"
    )
  chip, chips = roofline.CHIPS[generation], math.prod(dims)
  # libtpu reads these at start-up; on a machine that is not a TPU VM it would otherwise query the
  # GCE metadata server and print a warning for each (accelerator type, worker hostnames). The
  # topology passed below is what determines the devices.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault(
      "TPU_ACCELERATOR_TYPE", f"{chip.accelerator_type}-{chips * chip.cores_per_chip}"
  )
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{generation}:{'x'.join(map(str, dims))}",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SystemExit(f"compile_check: libtpu cannot build topology {generation}:{dims}: {first}")
  return list(topology.devices)


def check_mesh_fits(mesh_cfg, num_devices: int) -> None:
  """One line naming the problem when the mesh's product is not the device count."""
  try:
    mesh_cfg.axis_sizes(num_devices)
  except ValueError as e:
    raise SystemExit(f"compile_check: {e}")


def mesh_for(mesh_cfg, devices):
  from moe.parallel import sharding  # pylint: disable=g-import-not-at-top

  check_mesh_fits(mesh_cfg, len(devices))
  return sharding.make_mesh(mesh_cfg, devices)


def compile_step(cfg, mesh_cfg, devices):
  """(compiled train step, mesh, abstract state) for `cfg` on `devices` split by `mesh_cfg`."""
  import jax  # pylint: disable=g-import-not-at-top
  from moe.parallel import sharding  # pylint: disable=g-import-not-at-top
  from moe.trainer import steps  # pylint: disable=g-import-not-at-top

  mesh = mesh_for(mesh_cfg, devices)
  rules = sharding.logical_rules(mesh_cfg.rules)
  try:
    sharding.check_divisibility(
        mesh, mesh_cfg, cfg.model, cfg.train.global_batch_size, cfg.train.seq_len
    )
  except ValueError as e:
    raise SystemExit(f"compile_check: {e}")
  graphdef, rest, tx, state, state_sharding = steps.init_train_state(
      cfg, mesh, rules, abstract=True
  )
  batch_sharding = sharding.batch_sharding(mesh)
  shape = (cfg.train.global_batch_size, cfg.train.seq_len)
  batch = {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
      for k, dtype in (("inputs", "int32"), ("targets", "int32"), ("weights", "float32"))
  }
  with sharding.use_mesh(mesh, rules):
    step = steps.make_train_step(
        graphdef, rest, cfg, tx, state_sharding=state_sharding, batch_sharding=batch_sharding
    )
    return step.lower(state, batch).compile(), mesh, state


def device_bytes(compiled) -> dict[str, int]:
  """Arguments, outputs not aliased to a donated argument, temporaries, and their sum: what the
  compiled program needs on each device at its peak."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {"arguments": 0, "outputs": 0, "temporaries": 0, "total": 0}
  out = dict(
      arguments=stats.argument_size_in_bytes,
      outputs=stats.output_size_in_bytes - stats.alias_size_in_bytes,
      temporaries=stats.temp_size_in_bytes,
  )
  return {**out, "total": sum(out.values())}


def model_flops_per_device(cfg, num_devices: int) -> float:
  """PaLM-style model FLOPs of one step per device (moe.models.accounting), the MFU numerator."""
  from moe.models import accounting  # pylint: disable=g-import-not-at-top

  per_token = accounting.model_flops_per_token(cfg.model, cfg.train.seq_len, train=True).total
  return per_token * cfg.train.global_batch_size * cfg.train.seq_len / num_devices


def experiment(mesh_text: str | None = None, batch: int | None = None):
  """The experiment of --config with --mesh and --global_batch_size applied."""
  from moe.config import config_dict  # pylint: disable=g-import-not-at-top

  cfg = config_dict.experiment_from_config_dict(_CONFIG.value)
  if mesh_text:
    try:
      cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **parse_mesh(mesh_text)))
    except (TypeError, ValueError) as e:
      raise SystemExit(f"compile_check: --mesh={mesh_text}: {e}")
  if batch:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=batch))
  return cfg


def cost_program(cfg, compiled, devices):
  """The compiled step whose cost analysis counts every layer: with `scan_layers` XLA's cost
  analysis (and the collectives in the HLO text) count the scanned loop's body once, not once per
  period, so the cost comes from the same step compiled with its layers unrolled; the memory stays
  the configured program's."""
  if not cfg.model.scan_layers:
    return compiled
  unrolled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
  return compile_step(unrolled, unrolled.mesh, devices)[0]


def print_report(cfg, compiled, cost_compiled, mesh, chip, limit_gb: float | None):
  """Memory (of `compiled`), FLOPs and collectives (of `cost_compiled`, `cost_program`) per device;
  on a chip, the roofline step time and MFU."""
  from moe.parallel import roofline  # pylint: disable=g-import-not-at-top

  gib = lambda b: b / 2**30
  mem = device_bytes(compiled)
  print(
      "per device: "
      + ", ".join(f"{k} {gib(v):.3f} GiB" for k, v in mem.items() if k != "total")
      + f"; total {gib(mem['total']):.3f} GiB"
  )
  limit = limit_gb if limit_gb is not None else (chip.hbm_bytes / 2**30 if chip else None)
  if limit is not None:
    verdict = "fits" if gib(mem["total"]) <= limit else "DOES NOT FIT"
    print(f"needs {gib(mem['total']):.2f} GiB of {limit:.1f} GiB: {verdict}")
  shape = dict(mesh.shape)
  chip_or_cpu = chip or roofline.Chip("CPU", 1.0, 0, 1.0, 1.0, "-", "-", 1)
  report = roofline.analyse(cost_compiled, shape, chip_or_cpu)
  print(f"FLOPs per device {report.flops:.4g}, HBM bytes accessed {report.hbm_bytes:.4g}")
  print(
      "collective bytes per device: "
      + ", ".join(f"{op} {b / 2**20:.1f} MiB" for op, b in report.collective_bytes.items())
  )
  if chip is not None:
    model = model_flops_per_device(cfg, mesh.size)
    mfu = model / (report.step_seconds * chip.peak_flops)
    print(
        f"roofline: compute {report.compute_seconds * 1e3:.2f} ms, HBM {report.hbm_seconds * 1e3:.2f}"
        f" ms, ICI {report.ici_seconds * 1e3:.2f} ms -> step >= {report.step_seconds * 1e3:.2f} ms"
        f" ({report.bound}-bound), MFU <= {mfu:.1%} (model FLOPs {model:.4g} per device)"
    )
    print(
        f"{chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, HBM {chip.hbm_bytes / 1e9:.0f} GB"
        f" at {chip.hbm_bandwidth / 1e9:.0f} GB/s, ICI {chip.ici_bandwidth / 1e9:.0f} GB/s"
        f" (bidirectional, per chip); source: {chip.source}"
    )
  return mem, report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _TOPOLOGY.value and _FAKE_DEVICES.value:
    raise SystemExit("compile_check: --topology and --fake_devices exclude each other")
  chip = None
  if _TOPOLOGY.value:
    generation, dims = parse_topology(_TOPOLOGY.value)
  if _FAKE_DEVICES.value:  # Before the first device query creates the backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_FAKE_DEVICES.value}"
    )
  import jax  # pylint: disable=g-import-not-at-top
  from moe.parallel import roofline  # pylint: disable=g-import-not-at-top

  if _FAKE_DEVICES.value or _TOPOLOGY.value:  # A topology is compiled for, never opened.
    jax.config.update("jax_platforms", "cpu")
  cfg = experiment(_MESH.value, _BATCH.value)
  if _TOPOLOGY.value:
    chip = roofline.CHIPS[generation]
    chips = math.prod(dims)
    check_mesh_fits(cfg.mesh, chips)  # One line, before libtpu starts.
    devices = tpu_devices(generation, dims)
  else:
    devices = jax.devices()
  compiled, mesh, _ = compile_step(cfg, cfg.mesh, devices)
  shape = (cfg.train.global_batch_size, cfg.train.seq_len)
  print(
      f"{cfg.name}: mesh {dict(mesh.shape)} ({cfg.mesh.rules.value} rules), "
      f"{devices[0].device_kind} x {len(devices)}, batch {shape[0]} x {shape[1]}"
  )
  limit = _DEVICE_MEMORY_GB.value
  if limit is None and chip is None and not _FAKE_DEVICES.value:
    memory = (devices[0].memory_stats() or {}).get("bytes_limit")
    limit = memory / 2**30 if memory else None
  cost_compiled = cost_program(cfg, compiled, devices)
  mem, _ = print_report(cfg, compiled, cost_compiled, mesh, chip, limit)
  if limit is not None and mem["total"] / 2**30 > limit:
    raise SystemExit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])  # Here: experiments.weak_scaling imports this module.
  app.run(main)
