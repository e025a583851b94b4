"""Reuses a complete run for another config that is the same model, data and schedule under another
name, instead of training it again (a bit-identical retrain on the same machine costs minutes).

    python -m research.reuse_run --source=runs/sweeps/topk/topk-1_tiny/seed0 \\
      --workdir=runs/sweeps/capacity/capacity-1.25_tiny/seed0 \\
      --config=configs/ablations.py:family=capacity,member=1.25 [--set=field.path=value ...]

The copy is `research.sweep_plan.reuse`. The source must be complete
(`moe.trainer.workdir.is_complete`) and its config.json must equal the config of `--config` with the
`--set` overrides and the source's seed in every field but `name`; anything else is refused, naming
the fields that differ. The workdir must not exist. The copy keeps
the checkpoints, metrics and TensorBoard events and records the new config (its name) in config.json,
so a sweep over `--config` finds the run complete and skips it, and its report reads it as that
config's run.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from research import sweep_plan

_SOURCE = flags.DEFINE_string("source", None, "The complete run's workdir.", required=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The new run's workdir (must not exist).", required=True
)
_CONFIG = flags.DEFINE_string(
    "config", None, "The new run's config spec path[:arg].", required=True
)
_SET = flags.DEFINE_multi_string("set", [], "field.path=value overrides of --config; repeatable.")


def main(argv):
  del argv
  try:
    new = sweep_plan.reuse(
        pathlib.Path(_SOURCE.value), pathlib.Path(_WORKDIR.value), _CONFIG.value, _SET.value
    )
  except sweep_plan.ReuseError as error:
    raise SystemExit(str(error)) from None
  print(f"reuse_run: {_SOURCE.value} -> {_WORKDIR.value} as {new['name']}")


if __name__ == "__main__":
  app.run(main)
