"""Whole-model train step: compile time, step time, tokens/s, MFU and peak memory, configs side by side.

    python -m benchmarks.train_step --config=configs/switch.py:size=smoke --json -
    python -m benchmarks.train_step --config=configs/dense.py:size=base --sparse_counterparts \
        --steps=10 --warmup=3 --json=benchmarks/results/train_step_h100.json

Each `--config` is a config file spec as `experiments.train` takes it (`path[:arg]`, read by
ml_collections' config file parser and `moe.config.config_dict.experiment_from_config_dict`). The train state
and the jitted train step are built as training builds them (`moe.trainer.steps.init_train_state`,
`make_train_step` under the config's mesh and logical rules) and fed synthetic batches of the config's
shape: random token ids in the vocabulary, every weight 1 (random tokens route about evenly, which a
trained router on real text need not do). `--sparse_counterparts` adds, for `configs/dense.py:size=X`,
`configs/switch.py:size=X` and `configs/top2.py:size=X` (same `data=`).

Measured per config: the compile time of the step, the median wall time of `--steps` steps after
`--warmup` (each step blocked on), tokens/s = tokens per step / that median, and against the table's
peak FLOP/s (`moe.models.accounting.peak_flops_per_device`; none for a CPU, shown as n/a):

* MFU in model FLOPs (`accounting.model_flops_per_token`): the k experts a token uses, no capacity slack
  and no dispatch einsums, as PaLM counts it (Chowdhery et al. 2022, App. B), so the same model has the
  same MFU whatever its dispatch path;
* HFU, the hardware-FLOPs utilisation (`accounting.flops_per_token`: every capacity slot and the one-hot
  einsums as computed; rematerialisation not counted);
* peak memory: the device's `peak_bytes_in_use` where it reports one (GPU, TPU), else the compiled
  program's arguments + unaliased outputs + temporaries (`memory_analysis`, as
  `experiments.compile_check` counts them).

With more than one config, each runs in a child process of its own: the device's peak memory is a
per-process high-water mark, and each config should find the device empty. Rows go to a Markdown table
(stdout; stderr when the JSON goes to stdout) and, with `--json PATH` (`-`: stdout), to a JSON list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import benchmarks
from moe.config import config_dict
from moe.models import accounting
from moe.parallel import sharding
from moe.trainer import steps as steps_lib

# Config file arguments a sparse counterpart keeps (the size and the corpus); `match=` and its kin
# only make sense for the dense file.
_KEPT_ARGS = ("size", "data")
_COUNTERPARTS = ("switch.py", "top2.py")

# A repeated string, not ml_collections' config file flag: that one holds a single config.
_CONFIG = flags.DEFINE_multi_string("config", None, "A config file spec, path[:arg]")
_SPARSE_COUNTERPARTS = flags.DEFINE_bool(
    "sparse_counterparts",
    False,
    "For each configs/dense.py:size=X also run configs/switch.py and configs/top2.py.",
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.", lower_bound=0)
_BATCH = flags.DEFINE_integer(
    "batch", None, "Global batch size (default: the config's).", lower_bound=1
)
_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list here ('-': stdout).")
flags.mark_flag_as_required("config")


def counterpart_specs(spec: str) -> list[str]:
  """`configs/dense.py:size=X[,data=Y]` -> itself, then the switch and top-2 configs of that size.

  Raises:
    ValueError: `spec` is not a `dense.py` config file spec.
  """
  path, _, arg = spec.partition(":")
  directory, filename = os.path.split(path)
  if filename != "dense.py":
    raise ValueError(f"--sparse_counterparts needs a configs/dense.py spec, got --config={spec}")
  kept = [
      item.strip()
      for item in arg.split(",")
      if item.partition("=")[0].strip() in _KEPT_ARGS and item.strip()
  ]
  suffix = f":{','.join(kept)}" if kept else ""
  return [spec] + [os.path.join(directory, name) + suffix for name in _COUNTERPARTS]


def load_experiment(spec: str, batch: int | None = None):
  """The validated `ExperimentConfig` of a config file spec, as `experiments.train` reads it.

  Args:
    spec: `path[:arg]`, e.g. 'configs/dense.py:size=base'.
    batch: a global batch size to use instead of the config's (None: the config's).
  """
  # The config flag of experiments.train, on a flag registry of its own: one per spec.
  registry = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=registry, lock_config=True)
  registry(["benchmarks.train_step", f"--config={spec}"])
  cd = registry.config
  cfg = config_dict.experiment_from_config_dict(cd)
  if batch is not None:  # `replace` re-validates: the batch must still split into routing groups.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=batch))
  return cfg


def check_fits_mesh(spec: str, cfg, batch: int | None) -> None:
  """Raises, naming the config and --batch, when the batch or the model does not split over the mesh
  of this process's devices (`moe.parallel.sharding.check_divisibility`)."""
  try:
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_divisibility(
        mesh, cfg.mesh, cfg.model, cfg.train.global_batch_size, cfg.train.seq_len
    )
  except ValueError as error:
    given = f"--config={spec}" + ("" if batch is None else f" --batch={batch}")
    raise ValueError(f"{given}: {error}") from error


def synthetic_batches(cfg, count: int, batch_sharding, seed: int = 0) -> list[dict]:
  """`count` batches of the config's shape on the devices: uniform random token ids in the model's
  vocabulary, weights 1. Made before timing, so no host-to-device copy is timed."""
  rng = np.random.default_rng(seed)
  shape = (cfg.train.global_batch_size, cfg.train.seq_len)
  batches = []
  for _ in range(count):
    tokens = rng.integers(0, cfg.model.vocab_size, size=(shape[0], shape[1] + 1), dtype=np.int32)
    host = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones(shape, np.float32))
    batches.append(steps_lib.to_device(host, batch_sharding))
  return batches


def _peak_memory(devices, compiled) -> tuple[int | None, str]:
  """(bytes, source): the largest device's peak in use, else the compiled program's footprint."""
  stats = [d.memory_stats() or {} for d in devices]
  peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
  if peaks:
    return max(peaks), "device peak_bytes_in_use"
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None, "n/a"
  total = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      - analysis.alias_size_in_bytes
      + analysis.temp_size_in_bytes
  )
  return int(total), "compiled memory_analysis"


def time_steps(compiled, state, batches: list[dict], *, steps: int, warmup: int):
  """Runs `warmup` then `steps` train steps, each blocked on (the state is donated: each step takes
  the last one's); returns the timed steps' seconds and the last step's metrics."""
  times, metrics = [], None
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times, metrics


def measure(spec: str, cfg, *, steps: int, warmup: int) -> dict:
  """Builds, compiles and times the train step of one config in this process; returns its row.

  Args:
    spec: the config file spec (the row's name).
    cfg: its `ExperimentConfig` (`load_experiment`).
    steps, warmup: timed steps (the median is reported) and untimed steps before them.
  """
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_divisibility(
      mesh, cfg.mesh, cfg.model, cfg.train.global_batch_size, cfg.train.seq_len
  )
  rules = sharding.logical_rules(cfg.mesh.rules)
  graphdef, rest, tx, state, state_sharding = steps_lib.init_train_state(cfg, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = synthetic_batches(cfg, min(warmup + steps, 8), batch_sharding)  # Cycled.

  t0 = time.perf_counter()  # As moe.trainer.loop._compile_train_step: trace, lower and compile.
  with sharding.use_mesh(mesh, rules):
    step = steps_lib.make_train_step(
        graphdef, rest, cfg, tx, state_sharding=state_sharding, batch_sharding=batch_sharding
    )
    compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0

  times, metrics = time_steps(compiled, state, batches, steps=steps, warmup=warmup)
  devices = list(mesh.devices.flat)
  kind = devices[0].device_kind
  step_s = statistics.median(times)
  tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
  tokens_per_s = tokens_per_step / step_s
  seq_len = cfg.train.seq_len
  model_flops = accounting.model_flops_per_token(cfg.model, seq_len, train=True).total
  hardware_flops = accounting.flops_per_token(cfg.model, seq_len, train=True).total
  peak = accounting.peak_flops_per_device(kind, cfg.model.dtype)
  utilisation = lambda flops: None if peak is None else flops * tokens_per_s / (peak * len(devices))
  memory, memory_source = _peak_memory(devices, compiled)
  params = accounting.param_counts(cfg.model)
  return dict(
      config=spec,
      name=cfg.name,
      device_kind=kind,
      num_devices=len(devices),
      jax_version=jax.__version__,
      dtype=cfg.model.dtype,
      global_batch_size=cfg.train.global_batch_size,
      seq_len=seq_len,
      tokens_per_step=tokens_per_step,
      params_total=params.total,
      params_active=params.active,
      compile_s=compile_s,
      warmup=warmup,
      steps=len(times),
      step_time_s=step_s,
      step_time_min_s=min(times),
      step_time_max_s=max(times),
      tokens_per_s=tokens_per_s,
      model_flops_per_token=model_flops,
      hardware_flops_per_token=hardware_flops,
      peak_flops_per_device=peak,
      mfu=utilisation(model_flops),
      hfu=utilisation(hardware_flops),
      peak_memory_bytes=memory,
      memory_source=memory_source,
      final_loss=float(metrics["loss"]),
  )


def measure_in_child(spec: str, *, steps: int, warmup: int, batch: int | None) -> dict:
  """`measure` in a fresh Python process (an empty device and its own peak-memory mark). A child that
  fails (an out-of-memory, say) gives a row with `error` and the end of its output.

  Args:
    spec: the config file spec.
    steps, warmup, batch: as the flags of the same names.
  """
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    command = [sys.executable, "-m", "benchmarks.train_step", f"--config={spec}"]
    command += [f"--steps={steps}", f"--warmup={warmup}", f"--json={out}"]
    command += [] if batch is None else [f"--batch={batch}"]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    sys.stderr.write(child.stderr)  # Its table goes to stderr too: stdout may hold our JSON.
    sys.stderr.write(child.stdout)
    if child.returncode == 0:
      with open(out) as f:
        return json.load(f)[0]
  tail = (child.stderr.strip().splitlines() or ["(no output)"])[-1].strip()
  return dict(config=spec, error=f"exit status {child.returncode}: {tail}")


def _percent(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.1%}"


def format_table(rows: list[dict]) -> str:
  """A Markdown table of the rows, with the device and each row's tokens/s and MFU relative to the
  first row's (the dense model, with `--sparse_counterparts`)."""
  ok = [r for r in rows if "error" not in r]
  first = ok[0] if ok else None
  lines = []
  if first is not None:
    lines.append(
        f"device: {first['device_kind']} x {first['num_devices']}, jax {first['jax_version']}, "
        f"{first['warmup']} warm-up + {first['steps']} timed steps (median)"
    )
  lines += [
      "",
      "| config | params total / active | dtype | batch x len | compile s | step ms | tokens/s "
      "| model GFLOPs/token | MFU | HFU | peak mem GiB | tokens/s, MFU vs first |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['config']} | failed: {r['error']} |" + " |" * 10)
      continue
    memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
    speed = r["tokens_per_s"] / first["tokens_per_s"]
    mfu_ratio = "n/a" if r["mfu"] is None else f"{r['mfu'] / first['mfu']:.2f}x"
    lines.append(
        f"| {r['config']} | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M "
        f"| {r['dtype']} | {r['global_batch_size']} x {r['seq_len']} | {r['compile_s']:.1f} "
        f"| {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} "
        f"| {r['model_flops_per_token'] / 1e9:.4f} | {_percent(r['mfu'])} | {_percent(r['hfu'])} "
        f"| {memory} | {speed:.2f}x, {mfu_ratio} |"
    )
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  specs, batch, steps, warmup = _CONFIG.value, _BATCH.value, _STEPS.value, _WARMUP.value
  try:
    if _SPARSE_COUNTERPARTS.value:
      specs = [s for spec in specs for s in counterpart_specs(spec)]
    configs = [load_experiment(spec, batch) for spec in specs]  # All refusals before compiling.
    if len(specs) == 1:
      # Only here: a GPU backend started by the parent of several children would hold the memory
      # they need; each child refuses its own config in its row.
      check_fits_mesh(specs[0], configs[0], batch)
  except (ValueError, OSError, flags.Error) as error:
    # A config file's error arrives inside absl's message with its traceback: its last line says it.
    sys.exit(f"benchmarks.train_step: {str(error).strip().splitlines()[-1].strip()}")
  if len(specs) == 1:
    rows = [measure(specs[0], configs[0], steps=steps, warmup=warmup)]
  else:
    rows = [measure_in_child(s, steps=steps, warmup=warmup, batch=batch) for s in specs]
  table_file = sys.stderr if _JSON.value == "-" else sys.stdout
  print(format_table(rows), file=table_file, flush=True)
  if _JSON.value == "-":
    json.dump(rows, sys.stdout, indent=1)
    print()
  elif _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  app.run(main, flags_parser=benchmarks.flags_parser("benchmarks.train_step"))
