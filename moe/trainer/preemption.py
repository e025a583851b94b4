"""Preemption: finish the step, save a checkpoint, exit with a status that asks to be requeued.

Cluster schedulers (SLURM, Kubernetes, TPU VM maintenance) send SIGTERM and wait a grace period before
killing a job. `WATCH` turns that notice into a step at which to stop:

* One process: a SIGTERM (or SIGINT, Ctrl-C) handler records the signal, from the first line of
  `experiments.train` (`install`) to the end of the final save. The loop sees it after the current
  step, saves that step synchronously and raises `Preempted`; during start-up (restore, compilation)
  it raises `Preempted` at the next stage, naming the newest checkpoint on disk; during the final
  evaluation or save it lets the save commit, then raises. A second signal is logged and otherwise
  ignored, so it cannot interrupt a save half-way.
* Several processes (`jax.distributed`): every process must save the same step, or the collective save
  deadlocks. JAX's preemption service (on by default with `jax.distributed.initialize`) already
  catches SIGTERM on any host, propagates it and agrees on the step:
  `multihost_utils.reached_preemption_sync_point(step)`, which orbax's `CheckpointManager` also uses
  for its preemption saves. It must be asked at every step, which the loop does.

`EXIT_CODE` (75, EX_TEMPFAIL of sysexits.h: "temporary failure, try again") is the status
`experiments.train` exits with after a preemption, so a wrapper can tell "requeue me" from a
failure (SLURM: `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`; Kubernetes: a `podFailurePolicy`
rule with `onExitCodes: {operator: In, values: [75]}` and `action: Ignore` retries it). Rerunning the
same command resumes from the saved step.

Tests place a signal at an exact moment with `at(point)` (see there), not with a timer.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax
from absl import logging

EXIT_CODE = 75
# Test hook, off unless set: "point=SIGNAL[,point=SIGNAL...]" (e.g. "saving:60=SIGTERM"). At each named
# point the process sends itself that signal, so a test hits an exact moment (the final save,
# start-up) deterministically. Points: "startup" (experiments.train's main), "restored" (after the
# restore), "compiled" (after the train step compiled), "step:N" (after step N ran), "evaluated:N"
# (after the evaluation at N is written), "saving:N" (checkpoint N's save started, still in flight).
SIGNAL_AT_ENV = "MOE_SIGNAL_AT"


def at(point: str) -> None:
  """The test hook (`SIGNAL_AT_ENV`): signals this process if `point` is named there; else nothing."""
  spec = os.environ.get(SIGNAL_AT_ENV)
  if not spec:
    return
  for item in spec.split(","):
    name, _, sig = item.partition("=")
    if name == point:
      os.kill(os.getpid(), signal.Signals[sig])


class Preempted(Exception):
  """Raised once what a preemption leaves on disk is final: `on_disk` says what that is."""

  def __init__(self, reason: str, when: str, on_disk: str):
    super().__init__(
        f"preempted ({reason}) {when}: {on_disk}; rerun the same command to resume (exit status "
        f"{EXIT_CODE})"
    )


class PreemptionWatch:
  """Records SIGTERM/SIGINT (one process) and answers `reached(step)`.

  `install` puts the handlers in place for the rest of the process (what `experiments.train` does at
  its first line). Used as a context manager without `install` (a library caller), it installs them
  for the block only, and restores the previous ones on the way out, after everything in the block
  (the final save included) is done. With several processes JAX's preemption service owns SIGTERM.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}
    self._installed = self._owner = False
    self._multi = False

  def install(self, held=()) -> PreemptionWatch:
    """Installs the handlers (main thread only) and replays `held`, signal numbers an earlier,
    simpler handler recorded before this module could be imported."""
    if not self._installed and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
      self._installed = True
    for signum in held:
      self._handle(signum, None)
    return self

  def several_processes(self) -> None:
    """After `jax.distributed.initialize`: JAX's preemption service now holds SIGTERM and the loop asks
    it at every step; SIGINT goes back to Python's default (KeyboardInterrupt)."""
    self._multi = jax.process_count() > 1
    if self._multi and signal.SIGINT in self._previous:
      signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))

  def __enter__(self) -> PreemptionWatch:
    if not self._installed:
      self.signal_name, self._owner = None, True
      self.install()
    self.several_processes()
    return self

  def __exit__(self, *exc) -> None:
    if self._owner:
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)
      self._previous.clear()
      self._installed = self._owner = False

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal_name is None:
      self.signal_name = name
      logging.warning("%s received: stopping at the next safe point with a checkpoint", name)
    else:
      logging.warning("%s received again: still stopping, not interrupting a save", name)

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop. Several processes: called at every step, by every process."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "preemption notice"
        return True
      return False
    return self.signal_name is not None

  def stop_if_signalled(self, when: str, on_disk: Callable[[], str]) -> None:
    """Raises `Preempted` if a signal was recorded (one process; several agree at a step instead).

    Args:
      when: e.g. "during start-up", for the message.
      on_disk: what the workdir holds, e.g. "checkpoint 40 is the newest on disk" (asked only then).
    """
    if self.signal_name is not None and not self._multi:
      raise Preempted(self.signal_name, when, on_disk())


# The process's watch: the handlers are one per process.
WATCH = PreemptionWatch()
