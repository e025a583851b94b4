"""The training configuration: optimisation, schedule, loop periods, and what a non-finite step does.

`TrainConfig` is a frozen dataclass validated in `__post_init__` (one line naming the field and its
range), like the model's configs in `moe.config`.
"""

from __future__ import annotations

import dataclasses
import enum

from moe.config.validation import as_enum, check_number


class Schedule(enum.Enum):
  COSINE = "cosine"  # Linear warmup, then cosine decay to `end_lr_fraction` of the peak.
  RSQRT = "rsqrt"  # Linear warmup, then 1/sqrt(step) (T5, Switch Transformer).
  CONSTANT = "constant"  # Linear warmup, then constant.


class EvalWindows(enum.Enum):
  """Which windows of the validation split an evaluation of `eval_batches` batches scores."""

  # Windows spread evenly over the whole split (window i of m is floor((i + 1/2) n / m) of the
  # split's n): every document is scored in proportion to its length, whatever the batch count.
  SPREAD = "spread"
  # The first windows in document order. The split's first document(s) only: kept to re-score
  # numbers measured that way, not for new measurements.
  PREFIX = "prefix"


class NonFinite(enum.Enum):
  """What a step with a non-finite loss or gradient norm does to the run."""

  STOP = "stop"  # Stop with an error naming the step; no checkpoint after the last finite step.
  SKIP = "skip"  # Skip the update (optax.apply_if_finite), stop after too many in a row.


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The optimisation and the loop. Loss = cross-entropy + moe.balance_loss_weight x balance loss
  (mean over sparse layers) + moe.z_loss_weight x z-loss (mean over sparse layers).

  Attributes:
    seed: parameters, data order and router jitter all derive from it (the jitter key of step t is
      fold_in(seed, t), so a resumed run draws the same noise).
    steps: optimiser steps.
    global_batch_size / seq_len: sequences per step over all processes, tokens per sequence.
    learning_rate, warmup_steps, schedule, end_lr_fraction: the learning-rate schedule.
    weight_decay: AdamW decay, masked off norms, biases and embeddings.
    b1, b2, eps: Adam moments.
    grad_clip_norm: global-norm clipping threshold (0 disables it).
    log_every, eval_every: progress/metrics period, evaluation period.
    eval_batches: global batches per evaluation (each `global_batch_size` windows of `seq_len`
      targets); None: the whole validation split; 0: no evaluation.
    eval_windows: which windows of the split those batches hold (`EvalWindows`): spread evenly over
      the split (the default), or its prefix. The evaluation's size in tokens is logged with every
      eval loss.
    checkpoint_every, keep_checkpoints: orbax checkpoint period and how many to keep (plus the last).
    peak_flops_per_device: for MFU; None looks the accelerator up in a table of known peaks.
    overwrite: allow a workdir that holds a run with a different config to be reused (its checkpoints
      are deleted first).
    allow_steps_change: allow resuming a run with a different `steps`, which re-stretches the
      learning-rate schedule from the resumed step on (recorded in the workdir's config_history.jsonl).
    on_nonfinite: a step whose loss or gradient norm is NaN or infinite stops the run ('stop': the
      error names the step and the non-finite terms, no checkpoint is written after the last finite
      step) or is skipped ('skip': parameters and optimiser state are left as they were, as PaLM and
      optax.apply_if_finite do; a skipped step does not advance the optimiser's own schedule count).
    max_consecutive_skips: with 'skip', the run stops once this many steps in a row were skipped.
    init_from: the workdir of a trained dense run to start from (sparse upcycling, Komatsuzaki et al.
      2022; `moe.models.upcycle`): its latest checkpoint's parameters are copied into this model, every expert
      of a sparse layer a copy of that layer's dense MLP, the routers freshly initialised. Read only
      when a run starts at step 0; a resumed run restores its own checkpoint. None: random init. Not a
      resumable field (`moe.trainer.workdir.RESUMABLE_FIELDS`): like the seed, it decides where the run's
      trajectory starts, so a workdir refuses a relaunch that names another source.
    init_from_noise: relative std of the multiplicative noise on the copied expert weights, w * (1 +
      noise * N(0, 1)) drawn independently per expert, which breaks the experts' symmetry; 0: exact
      copies.
  """

  seed: int = 0
  steps: int = 1000
  global_batch_size: int = 32
  seq_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  schedule: Schedule | str = Schedule.COSINE
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int | None = 8
  eval_windows: EvalWindows | str = EvalWindows.SPREAD
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  peak_flops_per_device: float | None = None
  overwrite: bool = False
  allow_steps_change: bool = False
  on_nonfinite: NonFinite | str = NonFinite.STOP
  max_consecutive_skips: int = 10
  init_from: str | None = None
  init_from_noise: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "schedule", as_enum(Schedule, self.schedule, "train.schedule"))
    object.__setattr__(
        self, "on_nonfinite", as_enum(NonFinite, self.on_nonfinite, "train.on_nonfinite")
    )
    object.__setattr__(
        self, "eval_windows", as_enum(EvalWindows, self.eval_windows, "train.eval_windows")
    )
    for name in (
        "steps",
        "global_batch_size",
        "seq_len",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_consecutive_skips",
    ):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"train.{name}={value!r} must be an integer >= 1")
    if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
      raise ValueError(f"train.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
    if self.eval_batches is not None:
      check_number(
          "train.eval_batches",
          self.eval_batches,
          low=0,
          integer=True,
          hint=", or None (the whole validation split)",
      )
    if self.warmup_steps > self.steps:
      raise ValueError(
          f"train.warmup_steps={self.warmup_steps} must be <= train.steps={self.steps}"
      )
    check_number("train.learning_rate", self.learning_rate, low=0, low_open=True)
    check_number("train.end_lr_fraction", self.end_lr_fraction, low=0, high=1)
    check_number("train.weight_decay", self.weight_decay, low=0)
    check_number("train.grad_clip_norm", self.grad_clip_norm, low=0, hint=" (0: no clipping)")
    for name in ("b1", "b2"):  # Adam's moment decay rates (Kingma & Ba 2015): in [0, 1).
      check_number(f"train.{name}", getattr(self, name), low=0, high=1, high_open=True)
    check_number("train.eps", self.eps, low=0, low_open=True)
    if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
      raise ValueError(
          f"train.init_from={self.init_from!r} must be None or the workdir of a dense run"
      )
    check_number("train.init_from_noise", self.init_from_noise, low=0)
    if self.init_from_noise and self.init_from is None:
      raise ValueError(
          f"train.init_from_noise={self.init_from_noise} needs train.init_from (the dense run whose "
          "copied experts it perturbs)"
      )
    if self.peak_flops_per_device is not None:
      check_number("train.peak_flops_per_device", self.peak_flops_per_device, low=0, low_open=True)
