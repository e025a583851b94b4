"""The training loop: checks the config, resumes from the workdir, trains, evaluates, checkpoints.
It stops early, with a checkpoint, on a preemption notice (`moe.trainer.preemption`), and without one at a
non-finite step (`moe.trainer.progress.Diverged`, `train.on_nonfinite`).

    metrics = train_and_evaluate(cfg, workdir)      # cfg: moe.config.experiment.ExperimentConfig

The pieces live beside it: the jitted steps and the train state in `moe.trainer.steps`, the workdir's config
and metrics files in `moe.trainer.workdir`, checkpoints in `moe.trainer.checkpoints`, timing and the train records in
`moe.trainer.progress`, FLOPs and peak FLOP/s in `moe.models.accounting`. Randomness is a function of (seed, step)
(`moe.trainer.steps`) and the data order of `data.seed`, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax

from moe import data as data_lib
from moe.config.experiment import ExperimentConfig
from moe.config.train import EvalWindows
from moe.models import upcycle
from moe.models.accounting import peak_flops_per_device, summary
from moe.parallel import sharding
from moe.trainer import checkpoints, preemption, run_records, steps, workdir as workdir_lib
from moe.trainer.preemption import Preempted, PreemptionWatch
from moe.trainer.progress import print_line, Progress


def _check(cfg: ExperimentConfig):
  """Everything that can reject the config, before the workdir is touched (an overwrite must never
  destroy a run for a config that cannot start). Returns (mesh, rules)."""
  data_vocab = data_lib.vocab_size(cfg.data)
  if data_vocab > cfg.model.vocab_size:
    raise ValueError(
        f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
        f"({data_vocab}, {cfg.data.tokenizer.value} tokenizer)"
    )
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_divisibility(
      mesh, cfg.mesh, cfg.model, cfg.train.global_batch_size, cfg.train.seq_len
  )
  return mesh, sharding.logical_rules(cfg.mesh.rules)


def _prepare_workdir(cfg: ExperimentConfig, workdir: pathlib.Path) -> None:
  if jax.process_index() == 0:
    workdir_lib.prepare_workdir(cfg, workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("moe.train.prepare_workdir")


def _data(cfg: ExperimentConfig):
  """(train iterator, eval batches or None) of this process."""
  tc = cfg.train
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_it = data_lib.train_iterator(
      cfg.data, seq_len=tc.seq_len, global_batch_size=tc.global_batch_size, **proc
  )
  eval_data = (
      data_lib.eval_batches(
          cfg.data,
          seq_len=tc.seq_len,
          global_batch_size=tc.global_batch_size,
          num_batches=tc.eval_batches,
          spread=tc.eval_windows is EvalWindows.SPREAD,
          **proc,
      )
      if tc.eval_batches != 0
      else None
  )
  return train_it, eval_data


def _train_records(workdir: pathlib.Path, start: int) -> list[dict]:
  """The train records of the steps up to `start` (none for a new run)."""
  records = run_records.read_metrics(workdir / run_records.METRICS)
  return [r for r in records if r.get("split") == "train" and 0 < r.get("step", 0) <= start]


def _final(workdir: pathlib.Path, progress: Progress, evaluated: dict, done: int) -> dict:
  """The returned metrics: this call's last records, else (a run that was already complete) the
  workdir's."""
  records = run_records.read_metrics(workdir / run_records.METRICS)
  last = {
      split: next((r for r in reversed(records) if r.get("split") == split), None)
      for split in ("train", "eval")
  }
  final = dict(progress.last)
  train_time = progress.train_time
  if last["train"] is not None:
    final = {**{k: last["train"][k] for k in ("loss", "ce", "perplexity")}, **final}
    train_time = last["train"].get("time_s", train_time)
  if last["eval"] is not None and not evaluated:
    evaluated = dict(eval_loss=last["eval"]["loss"], eval_perplexity=last["eval"]["perplexity"])
  final.update(evaluated)
  final.update(
      step=done,
      train_time_s=train_time,
      compile_time_s=progress.compile_time,
      tokens_per_s=done * progress.tokens_per_step / max(train_time, 1e-9),
  )
  mfu = progress.mfu(final["tokens_per_s"])
  if mfu is not None:
    final["mfu"] = mfu
  return final


@dataclasses.dataclass
class _RunContext:
  """What the loop needs besides the train state: fixed for the run, except the data iterator."""

  cfg: ExperimentConfig
  mesh: jax.sharding.Mesh
  rules: Any
  batch_sharding: jax.sharding.NamedSharding
  manager: Any  # orbax CheckpointManager
  writer: run_records.MetricsWriter
  progress: Progress
  data_it: Any  # grain iterator, restored with the checkpoint
  eval_data: Any  # eval batches, or None
  eval_step: Callable
  evaluated: dict  # eval_loss and eval_perplexity of this call's last evaluation

  def next_batch(self) -> steps.Batch:
    return steps.to_device(next(self.data_it), self.batch_sharding)

  def evaluate(self, state: steps.TrainState, step: int) -> None:
    with sharding.use_mesh(self.mesh, self.rules):
      variables = steps.model_variables(state)
      result = steps.evaluate(self.eval_step, variables, self.eval_data, self.batch_sharding)
    self.writer.write({"step": step, "split": "eval", **result})
    self.evaluated.update(eval_loss=result["loss"], eval_perplexity=result["perplexity"])
    print_line(
        f"eval  step {step} | loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f}"
        f" | {result['tokens']:,} tokens"
    )


def _compile_train_step(
    run: _RunContext, graphdef, rest, tx, state, state_sharding, batch
) -> Callable:
  """The train step, lowered and compiled for `state` and `batch` (logs the compile time)."""
  t0 = time.perf_counter()
  with sharding.use_mesh(run.mesh, run.rules):
    step = steps.make_train_step(
        graphdef,
        rest,
        run.cfg,
        tx,
        state_sharding=state_sharding,
        batch_sharding=run.batch_sharding,
    )
    compiled = step.lower(state, batch).compile()
  run.progress.compile_time = time.perf_counter() - t0
  print_line(
      f"{run.cfg.name}: {summary(run.cfg.model, run.cfg.train.seq_len)}; mesh {dict(run.mesh.shape)}"
      f" ({run.cfg.mesh.rules.value} rules); compiled the train step in "
      f"{run.progress.compile_time:.1f} s"
  )
  return compiled


def _note_committed(workdir: pathlib.Path) -> None:
  """Records the newest committed checkpoint (`workdir.checkpoints_lost` reads it). Process 0."""
  saved = checkpoints.steps_of(workdir)
  if saved and jax.process_index() == 0:
    workdir_lib.note_checkpoint(workdir, saved[0])


def _train(
    run: _RunContext, train_step: Callable, state, batch, start: int, watch: PreemptionWatch
):
  """Steps start+1 .. train.steps; evaluates and checkpoints on their periods and at the end. The
  final save may still be in flight on return.

  Raises:
    Preempted: after saving the step at which a preemption notice was seen (`moe.trainer.preemption`).
    Diverged: at a non-finite step, before any checkpoint of it (`moe.trainer.progress`).
    SaveFailed: the step after a background save failed.
  """
  tc = run.cfg.train
  run.progress.resume()
  pending = None  # (step, metrics) of the step in flight: metrics are pulled one step behind.
  for done in range(start + 1, tc.steps + 1):
    state, metrics = train_step(state, batch)
    checkpoints.raise_if_save_failed(run.manager)
    preemption.at(f"step:{done}")
    if pending is not None:
      run.progress.finish(*pending)
    pending = (done, metrics)
    preempted = watch.reached(done)  # Asked at every step: several processes agree on the step.
    evaluate_now = run.eval_data is not None and (done % tc.eval_every == 0 or done == tc.steps)
    checkpoint_now = done % tc.checkpoint_every == 0 or done == tc.steps or preempted
    if evaluate_now or checkpoint_now:
      run.progress.finish(*pending)  # Raises Diverged before a non-finite step is saved.
      pending = None
      # Evaluate first: a crash between the two then only loses work that the resumed run redoes.
      if evaluate_now:
        run.evaluate(state, done)
        preemption.at(f"evaluated:{done}")
      if checkpoint_now:
        checkpoints.save(run.manager, done, state, run.data_it)  # Async: returns once off device.
        preemption.at(f"saving:{done}")
        _note_committed(pathlib.Path(run.manager.directory).parent)  # save() awaited the previous.
      if preempted:
        checkpoints.finish_saves(run.manager)
        raise Preempted(watch.signal_name, f"after step {done}", f"checkpoint {done} is saved")
      run.progress.resume()  # Evaluation and checkpointing are not training time.
    if done < tc.steps:
      batch = run.next_batch()


def train_and_evaluate(cfg: ExperimentConfig, workdir: str) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns the final metrics.

  Holds the workdir's lock (`moe.trainer.workdir.locked`) and the preemption handlers
  (`moe.trainer.preemption.WATCH`) until the final save has committed.

  Args:
    cfg: the experiment.
    workdir: where config.json, checkpoints/, metrics.jsonl and tensorboard/ live (`moe.trainer.workdir`).

  Returns:
    {'step', 'loss', 'ce', 'perplexity' (last train record), 'eval_loss', 'eval_perplexity' (final
    evaluation; absent when train.eval_batches is 0), 'tokens_per_s' (over the whole run),
    'train_time_s' (cumulative, excluding compilation, evaluation and checkpointing),
    'compile_time_s' (this call), 'mfu' (model FLOPs utilisation, when the peak is known)}.

  Raises:
    Preempted: a SIGTERM/SIGINT anywhere in the call, once what it leaves on disk is final.
    ValueError (WorkdirError, CheckpointIncompatible): a refused config or workdir.
    CheckpointsDamaged, SaveFailed, Diverged: see there.
  """
  path = pathlib.Path(workdir).absolute()
  mesh, rules = _check(cfg)
  upcycle.check_init_from(cfg, path)  # Before the workdir is touched; a resumed run skips it.
  with preemption.WATCH as watch:
    lock = workdir_lib.locked(path) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
      return _train_and_evaluate(cfg, path, mesh, rules, watch)


def _train_and_evaluate(cfg, path: pathlib.Path, mesh, rules, watch: PreemptionWatch) -> dict:
  tc = cfg.train
  start_up = lambda: watch.stop_if_signalled("during start-up", lambda: checkpoints.on_disk(path))
  start_up()
  _prepare_workdir(cfg, path)
  lost = workdir_lib.checkpoints_lost(path)  # Asked before the manager creates checkpoints/.
  data_it, eval_data = _data(cfg)
  graphdef, rest, tx, state, state_sharding = steps.init_train_state(cfg, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  manager = checkpoints.make_manager(path / "checkpoints", tc.keep_checkpoints)
  try:
    start, state, data_it = checkpoints.restore_latest(manager, state, data_it)
    if start:
      print_line(f"Resumed from {manager.directory} at step {start}")
    else:
      if lost and jax.process_index() == 0:
        workdir_lib.refuse_lost_history(cfg, path, lost)
      if tc.init_from is not None:  # A new run only: a resumed one has its own parameters.
        state = upcycle.init_from_dense(cfg, state, state_sharding, mesh, rules)
    preemption.at("restored")
    start_up()
    writer = run_records.MetricsWriter(
        path, start, [i for i, s in enumerate(cfg.model.sparse_mask) if s]
    )
  except BaseException:
    manager.close()
    raise
  peak = tc.peak_flops_per_device or peak_flops_per_device(
      jax.devices()[0].device_kind, cfg.model.dtype
  )
  with sharding.use_mesh(mesh, rules):  # The steps trace under the mesh: constraints apply.
    eval_step = steps.make_eval_step(
        graphdef,
        rest,
        cfg,
        params_sharding=steps.model_variables(state_sharding),
        batch_sharding=batch_sharding,
    )
  earlier = _train_records(path, start)
  train_time = earlier[-1].get("time_s", 0.0) if earlier else 0.0  # Spent before `start`.
  progress = Progress(cfg, start, train_time, writer, peak, earlier)
  run = _RunContext(
      cfg,
      mesh,
      rules,
      batch_sharding,
      manager,
      writer,
      progress,
      data_it,
      eval_data,
      eval_step,
      evaluated={},
  )
  try:
    if start < tc.steps:
      batch = run.next_batch()
      train_step = _compile_train_step(run, graphdef, rest, tx, state, state_sharding, batch)
      preemption.at("compiled")
      start_up()
      _train(run, train_step, state, batch, start, watch)
    checkpoints.finish_saves(manager)  # Never return (or raise) with a save in flight.
    _note_committed(path)
  except BaseException:
    with contextlib.suppress(Exception):  # The error in hand says more than a second one would.
      manager.close()  # Waits for a save in flight.
      writer.close()
    raise
  manager.close()
  writer.close()
  # A notice during the final evaluation or save: the save has committed, the run is complete.
  watch.stop_if_signalled(f"after step {tc.steps}", lambda: f"checkpoint {tc.steps} is saved")
  return _final(path, progress, run.evaluated, max(start, tc.steps))
