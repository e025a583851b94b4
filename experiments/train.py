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

import re
import sys

from absl import app, flags
from ml_collections import config_flags

from moe.config import config_dict
from moe.parallel import distributed
from moe.trainer import loop
from moe.trainer.checkpoints import CheckpointsDamaged
from moe.trainer.preemption import EXIT_CODE, Preempted
from moe.trainer.progress import Diverged
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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error said in one line (absl prints a config file's traceback,
  and a misspelt `--config.` field raises through three chained tracebacks before "Did you mean").
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # A config file that raised: its exception is the last line of the traceback absl quotes.
    message = f"{lines[0]} {lines[-1]}" if any("Traceback" in l for l in lines) else " ".join(lines)
  except (AttributeError, KeyError) as error:  # A --config. override naming no field.
    text = str(error).replace("\\n", " ").replace("\\'", "")
    key = re.search(r"(\w+)", text).group(1)
    given = next(
        (a.split("=")[0] for a in argv if re.match(rf"--config\.(\w+\.)*{key}[.=]", a)), key
    )
    hint = re.search(r'Did you mean "\w+"', text)
    message = f"{given}: no such config field" + (f". {hint.group(0)}?" if hint else "")
  sys.exit(f"experiments.train: {message}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    cd = _CONFIG.value
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
  except Preempted:
    sys.exit(
        EXIT_CODE
    )  # The loop printed the step it saved; "requeue me" (moe.trainer.preemption).
  except (ValueError, Diverged, CheckpointsDamaged) as error:
    if _VERBOSE.value:
      raise
    # A refused config or workdir, or a diverged run: one line, not a traceback.
    sys.exit(f"experiments.train: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
