"""Lowers and compiles the train step for a mesh without running it; prints memory per device.

    python -m experiments.compile_check --config=configs/switch.py:size=large \
        --mesh=data=2,expert=4,rules=expert_fsdp --fake_devices=8

Catches an out-of-memory (and any sharding error) before a launch, as MaxText's train_compile does.
Nothing is allocated: the train state is abstract (shapes, dtypes and shardings), and with
`--fake_devices=N` the step is compiled for N fake CPU devices, so a slice's program can be checked
on a laptop (CPU temporaries differ somewhat from an accelerator's; parameters and optimiser state are
exact). `--mesh` takes the fields of moe.parallel.sharding.MeshConfig (data, fsdp, expert, tensor, rules) and
overrides the config's mesh section.
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (path[:arg]).", lock_config=True
)
_MESH = flags.DEFINE_string("mesh", None, "Mesh fields, e.g. 'data=2,expert=4,rules=expert'.")
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_devices", 0, "Compile for this many fake CPU devices (0: the real devices)."
)
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    "device_memory_gb", None, "Memory per device to check against (default: as reported)."
)
flags.mark_flags_as_required(["config"])


def parse_mesh(text: str) -> dict:
  fields = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--mesh: expected key=value, got {item!r}")
    fields[key.strip()] = value.strip() if key.strip() == "rules" else int(value)
  return fields


def _bytes_per_device(tree, devices) -> dict:
  """Bytes each device holds of the arrays (ShapeDtypeStructs with shardings) in `tree`."""
  import jax  # pylint: disable=g-import-not-at-top

  totals = {d: 0 for d in devices}
  for leaf in jax.tree.leaves(tree):
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
      shape = [len(range(*i.indices(n))) for i, n in zip(index, leaf.shape)]
      totals[device] += math.prod(shape) * leaf.dtype.itemsize
  return totals


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _FAKE_DEVICES.value:  # Before the first device query creates the backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_FAKE_DEVICES.value}"
    )
  import jax  # pylint: disable=g-import-not-at-top
  from moe.trainer import steps  # pylint: disable=g-import-not-at-top
  from moe.config import config_dict
  from moe.parallel import sharding

  if _FAKE_DEVICES.value:
    jax.config.update("jax_platforms", "cpu")

  cfg = config_dict.experiment_from_config_dict(_CONFIG.value)
  mesh_cfg = cfg.mesh
  if _MESH.value:
    mesh_cfg = dataclasses.replace(mesh_cfg, **parse_mesh(_MESH.value))
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.logical_rules(mesh_cfg.rules)
  sharding.check_divisibility(
      mesh, mesh_cfg, cfg.model, cfg.train.global_batch_size, cfg.train.seq_len
  )

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
    compiled = step.lower(state, batch).compile()

  devices = list(mesh.devices.flat)
  params = _bytes_per_device(state.params, devices)
  opt = _bytes_per_device(state.opt_state, devices)
  stats = compiled.memory_analysis()
  temp = stats.temp_size_in_bytes if stats is not None else 0
  # Arguments (state and batch) + outputs not aliased to a donated argument + temporaries: what the
  # compiled program needs on each device at its peak.
  other = (
      stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
      if stats is not None
      else 0
  )
  gib = lambda b: b / 2**30
  print(
      f"{cfg.name}: mesh {dict(mesh.shape)} ({mesh_cfg.rules.value} rules), "
      f"{jax.devices()[0].device_kind}, batch {shape[0]} x {shape[1]}"
  )
  print(f"{'device':>8}{'params GiB':>12}{'opt GiB':>10}{'temp GiB':>10}{'total GiB':>11}")
  limit = _DEVICE_MEMORY_GB.value
  if limit is None and not _FAKE_DEVICES.value:
    memory = (devices[0].memory_stats() or {}).get("bytes_limit")
    limit = memory / 2**30 if memory else None
  worst = 0.0
  for d in devices:
    # `other` covers parameters, optimiser state, batch and metrics as the program sees them.
    total = gib(max(params[d] + opt[d], other) + temp)
    worst = max(worst, total)
    print(f"{d.id:>8}{gib(params[d]):>12.3f}{gib(opt[d]):>10.3f}{gib(temp):>10.3f}{total:>11.3f}")
  if limit is not None:
    verdict = "fits" if worst <= limit else "DOES NOT FIT"
    print(f"largest device needs {worst:.2f} GiB of {limit:.1f} GiB: {verdict}")
    if worst > limit:
      raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
