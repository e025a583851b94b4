"""Trains one experiment: flags -> config -> `moe.trainer.loop.train_and_evaluate`.

    python -m experiments.train --config=configs/switch.py:size=smoke --workdir=runs/smoke

Rerunning with the same --workdir resumes from its latest checkpoint.

The dense baseline of any sparse config, after its overrides (see research.baselines.matched_dense):

    python -m experiments.train --config=configs/top2.py:size=tiny --config.model.sparse_every=1 \
        --match_dense=active_flops --workdir=runs/top2_every1_dense

 Override fields on the command
line, e.g. --config.mesh.expert=4 --config.mesh.rules=expert (see moe.parallel.sharding), or
--config.train.steps=2000 --config.train.allow_steps_change=True to extend a run (see moe.trainer.workdir).

Exit status: 0 when the run is complete; 75 after a preemption (SIGTERM or SIGINT: the current step is
finished and saved, rerun the same command to resume; see moe.trainer.preemption); 1 with one line saying why
when the config or the workdir is refused, no checkpoint restores, or the run diverged (--verbose
shows the traceback).

Several hosts: run the same command on every host. TPU pods and SLURM/Open MPI GPU clusters are
detected from the environment; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (add --cpu_collectives for CPU-only processes).
"""

import signal

# Handlers from the first line: a notice during the imports below (jax takes seconds) is held, then
# acted on like any other (moe.trainer.preemption.WATCH.install); the default would kill the process
# with status 143, which a `[ $? -eq 75 ] && requeue` wrapper does not requeue.
_HELD: list[int] = []
for _sig in (signal.SIGTERM, signal.SIGINT):
  signal.signal(_sig, lambda signum, frame: _HELD.append(signum))

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging as std_logging
import sys

from absl import app, flags
from ml_collections import config_flags

from moe.config import command_line, config_dict
from moe.parallel import distributed
from moe.trainer import checkpoints, loop, preemption
from moe.trainer.checkpoints import CheckpointsDamaged, SaveFailed
from moe.trainer.preemption import EXIT_CODE, Preempted
from moe.trainer.progress import Diverged, print_line
from research import baselines

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (path[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and config.json."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes)."
)
_CPU_COLLECTIVES = flags.DEFINE_bool(
    "cpu_collectives", False, "Use gloo collectives between CPU processes."
)
_MATCH_DENSE = flags.DEFINE_enum(
    "match_dense",
    None,
    list(baselines.MATCHES),
    "Train the dense baseline of the (sparse) --config instead, matched on this measure.",
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On a refused config or a diverged run, raise with the traceback."
)
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator(  # An empty one would train into the current directory.
    "workdir", lambda value: value is None or bool(value.strip()), "--workdir is empty"
)


_NONE_FIELDS: list[str] = []  # --config.<field>=None, set after parsing (moe.config.command_line).


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error said in one line (`moe.config.command_line.parse`: a
  config file that is missing, does not run or raises, a misspelt `--config.` field) and `None`
  accepted for every optional field."""
  argv, _NONE_FIELDS[:] = command_line.split_none(argv)
  try:
    return command_line.parse(flags.FLAGS, argv)
  except ValueError as error:
    if "--verbose" in argv:
      raise
    sys.exit(f"experiments.train: {error}")


def main(argv):
  watch = preemption.WATCH.install(held=_HELD)
  preemption.at("startup")
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    watch.stop_if_signalled("during start-up", lambda: checkpoints.on_disk(_WORKDIR.value))
    cd = _CONFIG.value
    command_line.set_none(cd, _NONE_FIELDS)
    if _MATCH_DENSE.value is not None:
      cd = baselines.matched_dense(cd, _MATCH_DENSE.value)
    cfg = config_dict.experiment_from_config_dict(cd)  # Validates before compiling.
    distributed.initialize_distributed(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        cpu_collectives=_CPU_COLLECTIVES.value,
    )
    loop.train_and_evaluate(cfg, _WORKDIR.value)
  except Preempted as error:
    print_line(str(error))  # Names what is on disk: the line a requeued job's log ends with.
    sys.exit(EXIT_CODE)  # "Requeue me" (moe.trainer.preemption).
  except (ValueError, OSError, Diverged, CheckpointsDamaged, SaveFailed) as error:
    if _VERBOSE.value:
      raise
    if isinstance(error, SaveFailed):
      # The failed save's other write tasks fail the same way; asyncio would log each one's
      # traceback at exit ("Task exception was never retrieved") after the line that names it.
      std_logging.getLogger("asyncio").disabled = True
    # A refused config or workdir, a diverged run, a full disk: one line, not a traceback.
    sys.exit(f"experiments.train: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
