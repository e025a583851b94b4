"""Reuses a complete run for another config that is the same model, data and schedule under another
name, instead of training it again (a bit-identical retrain on the same machine costs minutes).

    python -m research.reuse_run --source=runs/sweeps/topk/topk-1_tiny/seed0 \\
      --workdir=runs/sweeps/capacity/capacity-1.25_tiny/seed0 \\
      --config=configs/ablations.py:family=capacity,member=1.25 [--set=field.path=value ...]

The source must be complete (`moe.trainer.workdir.is_complete`) and its config.json must equal the
config of `--config` with the `--set` overrides and the source's seed in every field but `name`;
anything else is refused, naming the fields that differ. The workdir must not exist. The copy keeps
the checkpoints, metrics and TensorBoard events and records the new config (its name) in config.json,
so a sweep over `--config` finds the run complete and skips it, and its report reads it as that
config's run.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from absl import app, flags

from moe import atomic_file
from moe.config.config_dict import experiment_from_config_dict, to_json
from moe.trainer import workdir as workdir_lib
from research import sweep_plan

_SOURCE = flags.DEFINE_string("source", None, "The complete run's workdir.", required=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The new run's workdir (must not exist).", required=True
)
_CONFIG = flags.DEFINE_string(
    "config", None, "The new run's config spec path[:arg].", required=True
)
_SET = flags.DEFINE_multi_string("set", [], "field.path=value overrides of --config; repeatable.")


class ReuseError(ValueError):
  """The source cannot stand for the new config's run."""


def reuse(source: pathlib.Path, workdir: pathlib.Path, spec: str, overrides=()) -> dict:
  """Copies the complete run in `source` to `workdir` as a run of `spec`; returns its config."""
  config_path = source / workdir_lib.CONFIG
  if not config_path.exists():
    raise ReuseError(f"reuse_run: {source} holds no run ({workdir_lib.CONFIG} is missing)")
  old = json.loads(config_path.read_text())
  seeded = [*overrides, f"train.seed={old['train']['seed']}"]
  new = to_json(experiment_from_config_dict(sweep_plan.with_overrides(spec, seeded)))
  new = json.loads(json.dumps(new))  # Tuples as lists, as config.json holds them.
  differences = workdir_lib.config_differences(old, new, resumable=("name",))
  if differences:
    raise ReuseError(f"reuse_run: {source} is not a run of {spec}: " + "; ".join(differences))
  if not workdir_lib.is_complete(source, old["train"]["steps"]):
    raise ReuseError(f"reuse_run: {source} is not complete")
  if workdir.exists():
    raise ReuseError(f"reuse_run: {workdir} exists: it is never overwritten")
  partial = workdir.with_name(workdir.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  shutil.copytree(source, partial, ignore=shutil.ignore_patterns(workdir_lib.LOCK))
  atomic_file.atomic_write(
      partial / workdir_lib.CONFIG, json.dumps(new, indent=2, sort_keys=True) + "\n"
  )
  partial.rename(workdir)  # A copy cut short is never taken for a complete run.
  return new


def main(argv):
  del argv
  try:
    new = reuse(
        pathlib.Path(_SOURCE.value), pathlib.Path(_WORKDIR.value), _CONFIG.value, _SET.value
    )
  except ReuseError as error:
    raise SystemExit(str(error)) from None
  print(f"reuse_run: {_SOURCE.value} -> {_WORKDIR.value} as {new['name']}")


if __name__ == "__main__":
  app.run(main)
