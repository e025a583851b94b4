"""Training progress: train time, throughput, MFU, and the train records written to metrics.jsonl.

Train time counts only the steps: compilation, evaluation and checkpointing are excluded (the loop
restarts the clock with `resume` after each). Metrics are pulled one step behind the step in flight, and pulling them
blocks, which also bounds the queue of dispatched steps.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from moe.config.experiment import ExperimentConfig
from moe.config.train import NonFinite
from moe.models import accounting
from moe.trainer.run_records import MetricsWriter
from moe.trainer.routing_health import LOAD, RoutingHealth


def print_line(message: str) -> None:
  """A progress line on the terminal (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def duration(seconds: float) -> str:
  """H:MM:SS."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Diverged(RuntimeError):
  """A step's loss or gradient norm was not finite, and `train.on_nonfinite` says to stop.

  Raised before the step is checkpointed: every checkpoint of the run holds a finite state.
  """

  def __init__(self, step: int, values: dict, skipped: int = 0):
    self.step = step
    self.terms = nonfinite_terms(values)
    after = f" after {skipped} skipped steps in a row" if skipped else ""
    hint = "lower train.learning_rate" + ("" if skipped else ", or set train.on_nonfinite=skip")
    super().__init__(
        f"diverged at step {step}{after}: non-finite {', '.join(self.terms)}; step {step} was not "
        f"saved, every checkpoint holds a finite state ({hint})"
    )


def nonfinite_terms(values: dict) -> list[str]:
  """The metrics that are NaN or infinite, per sparse layer where they are lists ('router_entropy
  [sparse layer 0]'), in the order: loss terms, gradient norm, router statistics."""
  terms = []
  for key in ("ce", "z_loss", "balance_loss", "loss", "grad_norm", "router_entropy", "expert_load"):
    value = values.get(key)
    if value is None:
      continue
    array = np.asarray(value, np.float64)
    if array.ndim == 0:
      if not np.isfinite(array):
        terms.append(key)
    else:
      bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
      terms += [f"{key} [sparse layer {i}]" for i in np.flatnonzero(bad)]
  return terms


def _scalars(metrics: dict) -> dict:
  return {
      k: (float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist())
      for k, v in metrics.items()
  }


class Progress:
  """Times the steps and writes a record (and a progress line) every `train.log_every` steps.

  Args:
    cfg: the experiment.
    start: the step the run starts (or resumes) from.
    train_time: train seconds already spent before `start` (0 for a new run).
    writer: where the records go.
    peak_flops: peak FLOP/s per device for MFU, or None (no MFU).
    earlier_records: the run's train records before `start` (its routing-health window).
  """

  def __init__(
      self,
      cfg: ExperimentConfig,
      start: int,
      train_time: float,
      writer: MetricsWriter,
      peak_flops: float | None,
      earlier_records: list[dict] = (),
  ):
    self.cfg = cfg
    self.writer = writer
    self.train_time = train_time
    self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    # MFU counts model FLOPs (PaLM): independent of the dispatch path and the capacity slack.
    flops = accounting.model_flops_per_token(cfg.model, cfg.train.seq_len, train=True).total
    self.flops_per_s_at_peak = (
        None if peak_flops is None else peak_flops * jax.device_count() / flops
    )
    self.last = {}  # loss, ce, perplexity of the latest record.
    self.compile_time = 0.0  # Seconds this call spent compiling the train step.
    self.skipped = 0  # Non-finite steps in a row.
    self._window = (start, train_time)  # (step, train time) at the last record.
    self._mark = None
    self.health = RoutingHealth(cfg.train.log_every, earlier_records)

  def resume(self) -> None:
    """Starts the clock (after compilation, evaluation or a checkpoint)."""
    self._mark = time.perf_counter()

  def mfu(self, tokens_per_s: float) -> float | None:
    return None if self.flops_per_s_at_peak is None else tokens_per_s / self.flops_per_s_at_peak

  def finish(self, step: int, metrics: dict) -> None:
    """Blocks on `step`'s metrics and adds its time; writes a record if `step` is a log step or not
    finite. Raises `Diverged` when the step was not finite and the policy says to stop."""
    loss, grad_norm = jax.device_get((metrics["loss"], metrics["grad_norm"]))  # Blocks.
    now = time.perf_counter()
    self.train_time, self._mark = self.train_time + now - self._mark, now
    tc = self.cfg.train
    finite = bool(np.isfinite(loss) and np.isfinite(grad_norm))
    self.skipped = 0 if finite else self.skipped + 1
    if finite and step % tc.log_every and step != tc.steps:
      return
    values = _scalars(jax.device_get(metrics))
    if not finite:
      values["skipped"] = tc.on_nonfinite is NonFinite.SKIP
      self._record(step, dict(values))
      if tc.on_nonfinite is NonFinite.STOP or self.skipped >= tc.max_consecutive_skips:
        raise Diverged(step, values, self.skipped if tc.on_nonfinite is NonFinite.SKIP else 0)
      return
    self._record(step, values)

  def _record(self, step: int, values: dict) -> None:
    tc = self.cfg.train
    tokens_per_s = (
        (step - self._window[0])
        * self.tokens_per_step
        / max(self.train_time - self._window[1], 1e-9)
    )
    self._window = (step, self.train_time)
    record = {"step": step, "split": "train", "loss": values.pop("loss"), "ce": values.pop("ce")}
    record["perplexity"] = math.exp(min(record["ce"], 700.0))
    record.update(
        learning_rate=values.pop("learning_rate"),
        grad_norm=values.pop("grad_norm"),
        tokens_per_s=tokens_per_s,
        time_s=self.train_time,
    )
    values.pop("tokens")
    mfu = self.mfu(tokens_per_s)
    if mfu is not None:
      record["mfu"] = mfu
    record.update(values)  # z_loss, balance_loss and the per-layer lists of a sparse model.
    if LOAD in record:
      record.update(self.health.record(step, record[LOAD], self.writer.sparse_layers))
    self.writer.write(record)
    for line in self.health.warnings:
      print_line(line)
    self.last = {k: record[k] for k in ("loss", "ce", "perplexity")}
    eta = (tc.steps - step) * self.tokens_per_step / max(tokens_per_s, 1e-9)
    shown = "" if mfu is None else f" | MFU {mfu:.1%}"
    print_line(
        f"train step {step}/{tc.steps} | loss {record['loss']:.4f} | ce {record['ce']:.4f} | "
        f"lr {record['learning_rate']:.2e} | {tokens_per_s:,.0f} tok/s{shown} | "
        f"ETA {duration(eta)}"
    )
