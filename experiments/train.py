"""Trains one experiment: flags -> config -> `moe.train.train_and_evaluate`.

    python -m experiments.train --config=configs/switch.py:size=smoke --workdir=runs/smoke

Rerunning with the same --workdir resumes from its latest checkpoint. Override fields on the command
line, e.g. --config.train.steps=2000 (extending a run is allowed; see moe.train.RESUMABLE_FIELDS).
"""

from absl import app, flags
from ml_collections import config_flags

from moe import config as config_lib
from moe import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cfg = config_lib.experiment_from_config_dict(_CONFIG.value)
  train.train_and_evaluate(cfg, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
