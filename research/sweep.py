"""Runs a sweep: configs x seeds, plus matched dense baselines, one workdir each; resumable.

    python -m research.sweep --config=configs/ablations.py:family=experts --seeds=0,1,2 \
        --baselines=active_flops --root=runs/sweeps/experts
    python -m research.sweep ... --dry_run            # one launch command per line, runs nothing
    python -m research.report runs/sweeps/experts     # the table, JSON and plots

--config may be given several times; a config file with a `sweep(arg)` function expands into several
configs (configs/ablations.py without member=). --set=field.path=value (repeatable) changes every run,
e.g. --set=train.steps=2000 --set=data.source=python_stdlib. Baselines are the dense models matched to
each sparse config (research.baselines.matched_dense): active_flops (training FLOPs per token as computed:
router, capacity slack), active_params (k experts), total_params.

Rerunning the same command skips complete runs and resumes unfinished ones from their checkpoints.
Each run's output goes to <root>/<name>/seed<N>.log. Exit status: 0 when every run is complete; 75
when stopped by SIGTERM/SIGINT (the running runs save a checkpoint first: rerun to continue); 1 when a
run failed (the others still ran; see its log).
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

from absl import app, flags

from moe.trainer.preemption import EXIT_CODE
from research import sweep_plan
from research.baselines import MATCHES

_CONFIG = flags.DEFINE_multi_string("config", None, "Config spec path[:arg]; repeatable.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (train.seed), comma-separated.")
_ROOT = flags.DEFINE_string("root", None, "Directory of the sweep: one workdir per run under it.")
# A list, not absl's multi_enum: that one takes a repeated flag but refuses "a,b" (seen in a sweep).
_BASELINES = flags.DEFINE_list(
    "baselines", [], f"Matched dense baselines to add, comma-separated: {', '.join(MATCHES)}."
)
flags.register_validator(
    "baselines",
    lambda names: all(n in MATCHES for n in names),
    message=f"--baselines: each value must be one of {', '.join(MATCHES)}",
)
_SET = flags.DEFINE_multi_string("set", [], "field.path=value applied to every run; repeatable.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one launch command per run and exit.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Runs at a time (each uses every core).", lower_bound=1
)
flags.mark_flags_as_required(["config", "root"])


def _launch(run: sweep_plan.Run) -> subprocess.Popen:
  log = pathlib.Path(run.workdir).with_suffix(".log")
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "ab") as out:  # The child keeps its own handle.
    return subprocess.Popen(run.argv(), stdout=out, stderr=subprocess.STDOUT)


class _Stop:
  """SIGTERM/SIGINT: passed on to the running runs (they save and exit 75); nothing new starts."""

  def __init__(self):
    self.requested = False
    self.running: list[subprocess.Popen] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    for proc in self.running:
      if proc.poll() is None:
        proc.send_signal(signum)


def run_all(runs: list[sweep_plan.Run], parallel: int) -> int:
  """Runs the incomplete runs, `parallel` at a time; returns the exit status (see the docstring)."""
  todo = [r for r in runs if not sweep_plan.is_complete(r)]
  print(
      f"sweep: {len(runs) - len(todo)} of {len(runs)} runs complete, {len(todo)} to run", flush=True
  )
  stop, active, failed = _Stop(), {}, []
  while (todo and not stop.requested) or active:
    while todo and len(active) < parallel and not stop.requested:
      run = todo.pop(0)
      print(f"sweep: start {run.name} seed {run.seed}: {run.shell_command()}", flush=True)
      active[run] = _launch(run)
      stop.running = list(active.values())
    time.sleep(0.5)
    for run, proc in list(active.items()):
      if proc.poll() is None:
        continue
      del active[run]
      status = "done" if proc.returncode == 0 else f"exit {proc.returncode}"
      print(f"sweep: {status}: {run.name} seed {run.seed}", flush=True)
      if proc.returncode not in (0, EXIT_CODE):
        failed.append(f"{run.workdir} (exit {proc.returncode}; see {run.workdir}.log)")
  if stop.requested:
    print("sweep: stopped; rerun the same command to continue", flush=True)
    return EXIT_CODE
  for line in failed:
    print(f"sweep: failed: {line}", file=sys.stderr)
  return 1 if failed else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    bad = [s for s in _SEEDS.value if not s.strip().isdigit()]
    if bad:
      raise ValueError(f"--seeds: {', '.join(bad)} is not a non-negative integer")
    seeds = [int(s) for s in _SEEDS.value]
    runs = sweep_plan.plan(
        _CONFIG.value,
        seeds=seeds,
        root=_ROOT.value,
        baselines=_BASELINES.value,
        overrides=_SET.value,
    )
  except ValueError as error:
    sys.exit(f"research.sweep: {error}")
  if _DRY_RUN.value:
    for run in runs:
      print(run.shell_command())
    return
  try:
    sweep_plan.write_manifest(_ROOT.value, runs)  # Reads the sweep.json already there.
  except ValueError as error:
    sys.exit(f"research.sweep: {error}")
  sys.exit(run_all(runs, _PARALLEL.value))


if __name__ == "__main__":
  app.run(main)
