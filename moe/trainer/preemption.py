"""Preemption: finish the step, save a checkpoint, exit with a status that asks to be requeued.

Cluster schedulers (SLURM, Kubernetes, TPU VM maintenance) send SIGTERM and wait a grace period before
killing a job. `PreemptionWatch` turns that notice into a step at which to stop:

* One process: a SIGTERM (or SIGINT, Ctrl-C) handler records the signal; the loop sees it after the
  current step, saves that step synchronously and raises `Preempted`. A second signal during the save
  is logged and otherwise ignored, so it cannot interrupt the save half-way.
* Several processes (`jax.distributed`): every process must save the same step, or the collective save
  deadlocks. JAX's preemption service (on by default with `jax.distributed.initialize`) already
  catches SIGTERM on any host, propagates it and agrees on the step:
  `multihost_utils.reached_preemption_sync_point(step)`, which orbax's `CheckpointManager` also uses
  for its preemption saves. It must be asked at every step, which the loop does.

`EXIT_CODE` (75, EX_TEMPFAIL of sysexits.h: "temporary failure, try again") is the status
`experiments.train` exits with after a preemption save, so a wrapper can tell "requeue me" from a
failure (SLURM: `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`; Kubernetes: a `podFailurePolicy`
rule with `onExitCodes: {operator: In, values: [75]}` and `action: Ignore` retries it). Rerunning the
same command resumes from the saved step.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging

EXIT_CODE = 75


class Preempted(Exception):
  """Raised by the training loop after the preemption checkpoint of `step` is on disk."""

  def __init__(self, step: int, reason: str):
    super().__init__(
        f"preempted ({reason}) after step {step}: checkpoint {step} is saved; rerun the "
        f"same command to resume (exit status {EXIT_CODE})"
    )
    self.step = step


class PreemptionWatch:
  """Context manager: installs the signal handlers (one process), answers `reached(step)`.

  Handlers are installed only in the main thread of a single-process run and restored on exit; with
  several processes JAX's preemption service owns SIGTERM.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> PreemptionWatch:
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self.signal_name is None:  # Once preempted, the process is on its way out: a further notice
      for sig, handler in self._previous.items():  # is logged, never fatal, until it exits.
        signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal_name is None:
      self.signal_name = name
      logging.warning("%s received: finishing the current step, then saving a checkpoint", name)
    else:
      logging.warning("%s received again: still saving the checkpoint, not interrupting it", name)

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop. Several processes: called at every step, by every process."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "preemption notice"
        return True
      return False
    return self.signal_name is not None
