"""Training: pure, jitted train/eval steps and the loop that checkpoints, resumes and logs.

    metrics = train_and_evaluate(cfg, workdir)      # cfg: moe.config.ExperimentConfig

The train state is `TrainState(params, opt_state, step)`: the model's nnx.Param variables (split from the
model once), the optax state (over the bare arrays) and the number of completed optimiser steps. The
step merges the graph definition with the parameters inside `jax.jit`, so one compiled function runs
the whole run. Randomness is a function of (seed, step): parameters come from `nnx.Rngs(train.seed)`,
the router jitter of step t from `fold_in(key(train.seed), t)`, the data order from `data.seed`.

Workdir layout:
    config.json       the resolved config (JSON of the dataclasses, enums as their values)
    checkpoints/<s>/  orbax: 'state' (params, opt_state, step) and 'data' (the grain iterator state)
    metrics.jsonl     one JSON object per line, split 'train' or 'eval'; per sparse layer lists
    tensorboard/      tensorboardX event files (scalars; per-layer values as separate tags)

Resume: a workdir whose config.json matches restarts from its latest checkpoint (model, optimiser,
step, data iterator); records of metrics.jsonl after that step are dropped. The fields in
`RESUMABLE_FIELDS` may differ (see there); any other difference is refused unless `train.overwrite`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import pathlib
import shutil
import time
from typing import Any, Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from moe import accounting, files, optim, sharding
from moe import data as data_lib
from moe.config import ExperimentConfig
from moe.model import Transformer

# Fields that may differ between a run in a workdir and the config that resumes it. None of them
# changes the optimisation trajectory up to the steps already taken: the run length (to extend a run;
# note that with the cosine schedule a longer run re-stretches the decay from the resumed step on),
# logging/evaluation/checkpoint periods, the MFU peak, the overwrite flag, the run's display name,
# cache locations and the mesh (routing groups come from the data, never from the device layout, so
# a run may resume on a different number of devices; sums are then reordered, so equal up to rounding). `train.eval_batches` may not change: eval
# numbers of the two halves of a run would not be comparable.
RESUMABLE_FIELDS = ("name", "train.steps", "train.log_every", "train.eval_every",
                    "train.checkpoint_every", "train.keep_checkpoints",
                    "train.peak_flops_per_device", "train.overwrite", "data.cache_dir",
                    "data.tfds_data_dir", "mesh")

# Dense bf16 peak FLOP/s per device, by `device_kind` substring (first match wins: "v5 lite" before
# "v5", "H100 PCIe" before "H100"). H200 has the H100 SXM's compute. float32 models run their matmuls
# at half these rates (TF32 on NVIDIA, bf16 passes on TPU), see `peak_flops_per_device`.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("TPU v4", 275e12),
              ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
              ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))

Batch = dict[str, Any]  # 'inputs', 'targets' int32 [B, L], 'weights' float32 [B, L]


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree, donated to each step."""

  params: nnx.State  # nnx.Param variables, as split from the model.
  opt_state: Any  # optax state over nnx.as_pure(params).
  step: jax.Array  # int32 []: completed optimiser steps.


# ----------------------------------------------------------------------------------------------------
# Steps.


def _forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch, *,
             train: bool, rng: jax.Array | None):
  """Weighted CE sum, weight sum and the MoE aux (None when dense) of one batch."""
  model = nnx.merge(graphdef, params, rest)
  logits_BLV, aux = model(batch["inputs"], train=train, rng=rng)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"])
  weights_BL = batch["weights"].astype(jnp.float32)
  return jnp.sum(ce_BL * weights_BL), jnp.sum(weights_BL), aux


def _router_metrics(aux) -> dict[str, jax.Array]:
  """Per sparse layer statistics: dropped_fraction [n, k], expert_load [n, E], router_entropy [n]."""
  return dict(dropped_fraction=aux.stats.dropped_fraction, expert_load=aux.stats.expert_load,
              router_entropy=aux.stats.router_entropy)


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, cfg: ExperimentConfig,
                    tx: optax.GradientTransformation, *, state_sharding: Any = None,
                    batch_sharding: Any = None) -> Callable[[TrainState, Batch], tuple]:
  """Builds the jitted train step `(state, batch) -> (new state, metrics)`; `state` is donated.

  Loss = weighted mean token cross-entropy + moe.balance_loss_weight * mean over sparse layers of the
  balance loss + moe.z_loss_weight * mean of the z-loss (a dense model: the cross-entropy alone).

  Args:
    graphdef: the model's graph definition (`nnx.split(model, nnx.Param, ...)`).
    rest: the model's non-parameter state from the same split (closed over as constants).
    cfg: the experiment (train.seed for the jitter, model.moe for the loss weights).
    tx: the optimiser (`moe.optim.make_optimizer`).
    state_sharding / batch_sharding: pytrees of shardings for `TrainState` and the batch; when either
      is given the step is jitted with in/out shardings (the state keeps its sharding).

  Returns:
    The step. Metrics: loss, ce, grad_norm (before clipping), learning_rate (of this step), tokens
    (weight sum) and, for a sparse model, balance_loss, z_loss and the per-layer `_router_metrics`.
  """
  moe_cfg = cfg.model.moe if cfg.model.num_sparse_layers else None
  schedule = optim.learning_rate_schedule(cfg.train)
  seed = cfg.train.seed

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      ce_sum, w_sum, aux = _forward(graphdef, params, rest, batch, train=True, rng=rng)
      ce = ce_sum / jnp.maximum(w_sum, 1.0)
      extra = {"ce": ce, "tokens": w_sum}
      loss = ce
      if moe_cfg is not None:
        balance, z = jnp.mean(aux.losses.balance), jnp.mean(aux.losses.z)
        loss = ce + moe_cfg.balance_loss_weight * balance + moe_cfg.z_loss_weight * z
        extra.update(balance_loss=balance, z_loss=z, **_router_metrics(aux))
      return loss, extra

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    pure_params, pure_grads = nnx.as_pure(state.params), nnx.as_pure(grads)
    updates, opt_state = tx.update(pure_grads, state.opt_state, pure_params)
    new_pure = optax.apply_updates(pure_params, updates)
    # Same leaves in the same order: put the new arrays back into the nnx.Param variables.
    params = jax.tree.unflatten(jax.tree.structure(state.params), jax.tree.leaves(new_pure))
    metrics.update(loss=loss, grad_norm=optim.global_norm(pure_grads),
                   learning_rate=schedule(state.step))
    return TrainState(params, opt_state, state.step + 1), metrics

  kwargs = {}
  if batch_sharding is not None:  # Sharded: the state and the batch are placed, metrics replicated.
    # Metrics are replicated: every process can read them (a split metric is not addressable).
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.P())
    kwargs = dict(in_shardings=(state_sharding, batch_sharding),
                  out_shardings=(state_sharding, replicated))
  return jax.jit(train_step, donate_argnames=("state",), **kwargs)


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, cfg: ExperimentConfig, *,
                   params_sharding: Any = None, batch_sharding: Any = None) -> Callable:
  """Builds the jitted eval step `(params, batch) -> sums` (eval capacity factor, no jitter).

  Returns sums to be added over batches: ce_sum, tokens and, for a sparse model, the per-layer
  `_router_metrics` of the batch (averaged over batches by `evaluate`).
  """
  sparse = bool(cfg.model.num_sparse_layers)

  def eval_step(params: nnx.State, batch: Batch):
    ce_sum, w_sum, aux = _forward(graphdef, params, rest, batch, train=False, rng=None)
    out = {"ce_sum": ce_sum, "tokens": w_sum}
    if sparse:
      out.update(_router_metrics(aux))
    return out

  kwargs = {}
  if batch_sharding is not None:
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.P())
    kwargs = dict(in_shardings=(params_sharding, batch_sharding), out_shardings=replicated)
  return jax.jit(eval_step, **kwargs)


def init_train_state(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, rules, *,
                     abstract: bool = False):
  """Builds the model under the mesh, the optimiser and the train state, placed by the logical rules.

  Parameters are initialised inside one `jax.jit` whose out_shardings come from their logical axis
  names, so each device only ever holds its own shards; the optimiser moments mirror the parameters'
  shardings and scalars are replicated. Random initialisation does not depend on the mesh
  (partitionable threefry), so every mesh starts from the same parameters.

  Args:
    cfg: the experiment.
    mesh: from `moe.sharding.make_mesh`.
    rules: from `moe.sharding.logical_rules`.
    abstract: return ShapeDtypeStructs (with shardings) instead of arrays: nothing is allocated.

  Returns:
    (graphdef, rest, tx, state, state_sharding): the model's graph definition and non-parameter state
    (for `make_train_step`), the optimiser, the `TrainState` and its pytree of NamedShardings.
  """
  make_model = lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
  replicated = sharding.replicated(mesh)
  with sharding.use_mesh(mesh, rules):
    graphdef, abstract_params, rest = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
    params_sharding = sharding.named_shardings(abstract_params, mesh, rules)
    tx = optim.make_optimizer(cfg.train, abstract_params)
    opt_sharding = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, nnx.as_pure(abstract_params)),
        nnx.as_pure(params_sharding), transform_non_params=lambda _: replicated)
    state_sharding = TrainState(params_sharding, opt_sharding, replicated)

    def init() -> TrainState:
      params = nnx.state(make_model(), nnx.Param)
      return TrainState(params, tx.init(nnx.as_pure(params)), jnp.zeros((), jnp.int32))

    if abstract:
      state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           jax.eval_shape(init), state_sharding)
    else:
      state = jax.jit(init, out_shardings=state_sharding)()
  return graphdef, rest, tx, state, state_sharding


def to_device(batch: Batch, batch_sharding: Any = None) -> Batch:
  """Numpy batch (this process's rows) -> jax arrays split over the batch axes.

  With several processes, each passes only its own rows (process p holds rows [p * B_local,
  (p + 1) * B_local) of the global batch, as `moe.data` produces them) and they are assembled into
  global arrays with `jax.make_array_from_process_local_data`.
  """
  if batch_sharding is not None and jax.process_count() > 1:
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()}
  return {k: jax.device_put(np.asarray(v), batch_sharding) for k, v in batch.items()}


def evaluate(eval_step: Callable, params: nnx.State, batches, batch_sharding: Any = None) -> dict:
  """Token-weighted eval loss (= cross-entropy), perplexity and batch-averaged router statistics."""
  totals, stats, n = {"ce_sum": 0.0, "tokens": 0.0}, {}, 0
  for batch in batches:
    out = jax.device_get(eval_step(params, to_device(batch, batch_sharding)))  # Blocks: no backlog.
    n += 1
    for key, value in out.items():
      if key in totals:
        totals[key] += float(value)
      else:
        stats[key] = stats.get(key, 0.0) + np.asarray(value, np.float64)
  ce = totals["ce_sum"] / max(totals["tokens"], 1.0)
  result = {"loss": ce, "ce": ce, "perplexity": math.exp(min(ce, 700.0))}
  result.update({k: (v / n).tolist() for k, v in stats.items()})
  return result


# ----------------------------------------------------------------------------------------------------
# Workdir: config, metrics files.


def config_to_json(cfg: ExperimentConfig) -> dict:
  """The config as JSON-ready nested dicts (enums as values, tuples as lists)."""

  def convert(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, enum.Enum):
      return x.value
    if isinstance(x, dict):
      return {str(k): convert(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [convert(v) for v in x]
    return x

  return json.loads(json.dumps(convert(cfg)))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict) -> list[str]:
  """Dotted fields that differ between two `config_to_json` dicts, outside `RESUMABLE_FIELDS`."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  resumable = lambda key: any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS)
  missing = object()
  return [f"{key}: {old_flat.get(key, missing)!r} -> {new_flat.get(key, missing)!r}".replace(
              repr(missing), "<absent>")
          for key in sorted(set(old_flat) | set(new_flat))
          if not resumable(key) and old_flat.get(key, missing) != new_flat.get(key, missing)]


def prepare_workdir(cfg: ExperimentConfig, workdir: pathlib.Path) -> None:
  """Refuses a workdir that holds a run with a different config (unless train.overwrite, which clears
  it), then writes the resolved config to config.json. Process 0 only."""
  new = config_to_json(cfg)
  config_path = workdir / "config.json"
  outputs = [workdir / "checkpoints", workdir / "metrics.jsonl", workdir / "tensorboard"]
  differences = []
  if config_path.exists():
    differences = config_differences(json.loads(config_path.read_text()), new)
  elif any(p.exists() for p in outputs):
    differences = ["config.json is missing but the workdir holds checkpoints or metrics"]
  if differences:
    if not cfg.train.overwrite:
      raise ValueError(
          f"workdir {workdir} holds a run with a different config:\n  " + "\n  ".join(differences) +
          "\nUse another --workdir, or set train.overwrite=True to delete its checkpoints and metrics "
          f"(fields that may differ on resume: {', '.join(RESUMABLE_FIELDS)}).")
    logging.warning("train.overwrite: clearing %s (%s)", workdir, "; ".join(differences))
    for p in outputs:
      if p.is_dir():
        shutil.rmtree(p)
      elif p.exists():
        p.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  files.atomic_write(config_path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


class MetricsWriter:
  """metrics.jsonl (append-only lines) and TensorBoard scalars; a no-op off process 0."""

  def __init__(self, workdir: pathlib.Path, start_step: int, sparse_layers: list[int]):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.sparse_layers = sparse_layers
    self.tb = None
    if not self.active:
      return
    kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
    files.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step hides events a crashed run wrote after the checkpoint we resume from.
    self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")  # One write per line: a crash can only tear the last line.
    step, split = record["step"], record["split"]
    for key, value in record.items():
      if key in ("step", "split"):
        continue
      if isinstance(value, (int, float)):
        self.tb.add_scalar(f"{split}/{key}", value, step)
        continue
      for layer, per_layer in zip(self.sparse_layers, value):
        if isinstance(per_layer, list):
          sub = "rank" if key == "dropped_fraction" else "expert"
          for i, v in enumerate(per_layer):
            self.tb.add_scalar(f"{split}/{key}/layer{layer}/{sub}{i}", v, step)
        else:
          self.tb.add_scalar(f"{split}/{key}/layer{layer}", per_layer, step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def peak_flops_per_device(cfg: ExperimentConfig) -> float | None:
  """train.peak_flops_per_device, else the table entry for this accelerator and the model's compute
  dtype (float32: half the bf16 rate), else None (e.g. CPU)."""
  if cfg.train.peak_flops_per_device:
    return cfg.train.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  peak = next((peak for name, peak in PEAK_FLOPS if name.lower() in kind.lower()), None)
  if peak is not None and cfg.model.dtype == "float32":
    peak /= 2
  return peak


def _scalars(metrics: dict) -> dict:
  return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist())
          for k, v in metrics.items()}


def _print(message: str) -> None:
  """A progress line on the terminal (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)


class _QuietOrbax:
  """A logging filter: orbax logs every save at INFO; keep its warnings and errors only."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def _quiet_orbax() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(cfg: ExperimentConfig, workdir: str) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns the final metrics.

  Args:
    cfg: the experiment.
    workdir: where config.json, checkpoints/, metrics.jsonl and tensorboard/ live (see module doc).

  Returns:
    {'step', 'loss', 'ce', 'perplexity' (last train record), 'eval_loss', 'eval_perplexity' (final
    evaluation; absent when train.eval_batches is 0), 'tokens_per_s' (over the whole run),
    'train_time_s' (cumulative, excluding compilation, evaluation and checkpointing),
    'compile_time_s' (this call), 'mfu' (when the peak is known)}.
  """
  tc = cfg.train
  _quiet_orbax()
  workdir_path = pathlib.Path(workdir).absolute()
  # Everything that can reject the config runs before the workdir is touched: an overwrite must never
  # destroy a run for a config that cannot start.
  data_vocab = data_lib.vocab_size(cfg.data)
  if data_vocab > cfg.model.vocab_size:
    raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                     f"({data_vocab}, {cfg.data.tokenizer.value} tokenizer)")
  if cfg.model.moe is not None:
    cfg.model.moe.check_tokens(tc.global_batch_size, tc.seq_len)
  mesh_cfg = cfg.mesh or sharding.MeshConfig()
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.logical_rules(mesh_cfg.rules)
  sharding.check_divisibility(mesh, mesh_cfg, cfg.model, tc.global_batch_size, tc.seq_len)

  if jax.process_index() == 0:
    prepare_workdir(cfg, workdir_path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("moe.train.prepare_workdir")

  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  data_it = data_lib.train_iterator(cfg.data, seq_len=tc.seq_len, global_batch_size=tc.global_batch_size,
                                    **proc)
  eval_data = (data_lib.eval_batches(cfg.data, seq_len=tc.seq_len,
                                     global_batch_size=tc.global_batch_size,
                                     num_batches=tc.eval_batches, **proc)
               if tc.eval_batches else None)
  graphdef, rest, tx, state, state_sharding = init_train_state(cfg, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)

  manager = ocp.CheckpointManager(
      workdir_path / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True))
  start = manager.latest_step() or 0
  if start:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.as_pure(state))
    restored = manager.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_it)))
    state = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored["state"]))
    data_it = restored["data"]
    if int(state.step) != start:
      raise RuntimeError(f"checkpoint {start} holds step {int(state.step)}")
    _print(f"Resumed from {manager.directory} at step {start}")

  sparse_layers = [i for i, s in enumerate(cfg.model.sparse_mask) if s]
  writer = MetricsWriter(workdir_path, start, sparse_layers)
  previous = [r for r in read_metrics(workdir_path / "metrics.jsonl") if r.get("split") == "train"]
  train_time = previous[-1].get("time_s", 0.0) if (start and previous) else 0.0
  tokens_per_step = tc.global_batch_size * tc.seq_len
  flops_per_token = accounting.flops_per_token(cfg.model, tc.seq_len, train=True).total
  peak = peak_flops_per_device(cfg)
  with sharding.use_mesh(mesh, rules):  # The steps trace under the mesh: constraints apply.
    eval_step = make_eval_step(graphdef, rest, cfg, params_sharding=state_sharding.params,
                               batch_sharding=batch_sharding)
  final: dict[str, Any] = {}

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.as_pure(state)), data=grain.checkpoint.CheckpointSave(data_it)))

  def run_eval(step: int) -> None:
    with sharding.use_mesh(mesh, rules):
      result = evaluate(eval_step, state.params, eval_data, batch_sharding)
    writer.write({"step": step, "split": "eval", **result})
    final.update(eval_loss=result["loss"], eval_perplexity=result["perplexity"])
    _print(f"eval  step {step} | loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f}")

  compile_time = 0.0
  if start < tc.steps:
    t0 = time.perf_counter()
    first = to_device(next(data_it), batch_sharding)
    with sharding.use_mesh(mesh, rules):
      train_step = make_train_step(graphdef, rest, cfg, tx, state_sharding=state_sharding,
                                   batch_sharding=batch_sharding).lower(state, first).compile()
    compile_time = time.perf_counter() - t0
    _print(f"{cfg.name}: {accounting.summary(cfg.model, tc.seq_len)}; mesh {dict(mesh.shape)} "
           f"({mesh_cfg.rules.value} rules); compiled the train step in {compile_time:.1f} s")

  mark = time.perf_counter()
  window = (start, train_time)  # (step, cumulative train time) at the last progress line.

  def finish(step: int, metrics: dict) -> None:
    """Blocks on `step`'s metrics (bounding the dispatch queue); logs them if it is a log step."""
    nonlocal mark, train_time, window
    jax.block_until_ready(metrics["loss"])
    now = time.perf_counter()
    train_time, mark = train_time + now - mark, now
    if step % tc.log_every and step != tc.steps:
      return
    values = _scalars(jax.device_get(metrics))
    tokens_per_s = (step - window[0]) * tokens_per_step / max(train_time - window[1], 1e-9)
    window = (step, train_time)
    record = {"step": step, "split": "train", "loss": values.pop("loss"), "ce": values.pop("ce")}
    record["perplexity"] = math.exp(min(record["ce"], 700.0))
    record.update(learning_rate=values.pop("learning_rate"), grad_norm=values.pop("grad_norm"),
                  tokens_per_s=tokens_per_s, time_s=train_time)
    values.pop("tokens")
    if peak:
      record["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
    record.update(values)  # balance_loss, z_loss and the per-layer lists of a sparse model.
    writer.write(record)
    eta = (tc.steps - step) * tokens_per_step / max(tokens_per_s, 1e-9)
    mfu = f" | MFU {record['mfu']:.1%}" if peak else ""
    _print(f"train step {step}/{tc.steps} | loss {record['loss']:.4f} | ce {record['ce']:.4f} | "
           f"lr {record['learning_rate']:.2e} | {tokens_per_s:,.0f} tok/s{mfu} | ETA {_duration(eta)}")
    final.update({k: record[k] for k in ("loss", "ce", "perplexity")})

  pending = None  # (step, metrics) of the step in flight: metrics are pulled one step behind.
  batch = first if start < tc.steps else None
  try:
    for t in range(start, tc.steps):
      state, metrics = train_step(
          state, batch if batch is not None else to_device(next(data_it), batch_sharding))
      batch = None
      if pending is not None:
        finish(*pending)
      pending, done = (t + 1, metrics), t + 1
      evaluate_now = eval_data is not None and (done % tc.eval_every == 0 or done == tc.steps)
      checkpoint_now = done % tc.checkpoint_every == 0 or done == tc.steps
      if evaluate_now or checkpoint_now:
        finish(*pending)
        pending = None
        # Evaluate first: a crash between the two then only loses work that the resumed run redoes.
        if evaluate_now:
          run_eval(done)
        if checkpoint_now:
          save(done)  # Async: returns once the arrays are copied off the device.
        mark = time.perf_counter()  # Evaluation and checkpointing are not training time.
  finally:
    manager.wait_until_finished()  # Never return (or raise) with a save in flight.
    manager.close()
    writer.close()

  records = read_metrics(workdir_path / "metrics.jsonl")
  last = {split: next((r for r in reversed(records) if r.get("split") == split), None)
          for split in ("train", "eval")}
  if last["train"] is not None:  # A run that was already complete: its last records.
    final = {**{k: last["train"][k] for k in ("loss", "ce", "perplexity")}, **final}
    train_time = last["train"].get("time_s", train_time)
  if last["eval"] is not None and "eval_loss" not in final:
    final.update(eval_loss=last["eval"]["loss"], eval_perplexity=last["eval"]["perplexity"])
  done = max(start, tc.steps)
  final.update(step=done, train_time_s=train_time, compile_time_s=compile_time,
               tokens_per_s=done * tokens_per_step / max(train_time, 1e-9))
  if peak:
    final["mfu"] = final["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
  return final
