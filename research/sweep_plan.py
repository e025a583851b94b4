"""Sweeps: a set of configs times a set of seeds, one workdir each, with matched dense baselines.

    runs = plan(["configs/ablations.py:family=experts"], seeds=(0, 1, 2), root="runs/sweeps/experts",
                baselines=("active_flops",), overrides=("train.steps=2000",))
    for run in runs: print(run.shell_command())

A run is one `python -m experiments.train` command, so a sweep runs the same way on this machine, on a
cluster scheduler (`research.sweep --dry_run` prints the commands) or by hand. Its workdir is
`<root>/<config name>/seed<N>`; rerunning a command resumes the run from its checkpoint, and a run
whose final checkpoint has committed and whose final records are written is complete (`is_complete`)
and is skipped.

A config spec is `path[:arg]` as `experiments.train --config` takes it. A config file that defines
`sweep(arg) -> list of arg strings` expands into several configs (`configs/ablations.py` without a
`member=` expands to every member of its family). A baseline is the sparse config's command with
`--match_dense=<measure>` (`research.baselines.matched_dense`): the dense model of that exact config.
`reuse` copies a complete run to the workdir of a config that is the same model under another name.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import shutil
import sys
from typing import Iterable, Sequence

import ml_collections

from moe import atomic_file
from moe.config import command_line
from moe.config.config_dict import experiment_from_config_dict, to_json
from moe.trainer import run_records, workdir as workdir_lib
from research.baselines import matched_dense

MANIFEST = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep.

  Attributes:
    name: the config's name (a baseline: "<sparse name>_dense_<match>"); runs of one name differ only
      in their seed.
    seed: train.seed.
    spec: the config spec, `path[:arg]`.
    overrides: "field.path=value" applied to the config, in order.
    match: the baseline measure (`research.baselines.MATCHES`), or None for the config itself.
    baseline_of: for a baseline, the name of the sparse config it is matched to.
    workdir: `<root>/<name>/seed<seed>`.
    steps: train.steps: the run is complete when its workdir holds the evaluation at this step.
  """

  name: str
  seed: int
  spec: str
  overrides: tuple[str, ...]
  match: str | None
  baseline_of: str | None
  workdir: str
  steps: int

  def argv(self, python: str = sys.executable) -> list[str]:
    """The command that trains (or resumes) this run, from the repository root."""
    args = [python, "-m", "experiments.train", f"--config={self.spec}"]
    args += [f"--config.{o}" for o in self.overrides]
    args.append(f"--config.train.seed={self.seed}")
    if self.match is not None:
      args.append(f"--match_dense={self.match}")
    return args + [f"--workdir={self.workdir}"]

  def shell_command(self, python: str = "python") -> str:
    return shlex.join(self.argv(python))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file spec `path[:arg]`, as `experiments.train --config` loads it."""
  return command_line.load_config(spec)


def expand(spec: str) -> list[str]:
  """The config specs a spec stands for: its file's `sweep(arg)`, else the spec itself."""
  path, _, arg = spec.partition(":")
  module = command_line.load_module(path)
  if not hasattr(module, "sweep"):
    return [spec]
  return [f"{path}:{a}" if a else path for a in module.sweep(arg)]


def with_overrides(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config of `spec` with `field.path=value` overrides, parsed as the launched command's
  `--config.field.path=value` will be (`moe.config.command_line`, `None` included)."""
  try:
    return command_line.from_command_line(spec, overrides)
  except ValueError as error:
    raise ValueError(str(error).replace("--config.", "--set ")) from None


def config_of(run: Run) -> ml_collections.ConfigDict:
  """The ConfigDict a run trains (what its command builds), for running it in this process."""
  cd = _configured(run.spec, run.overrides, run.match)
  cd.train.seed = run.seed
  return cd


def _configured(spec: str, overrides: Sequence[str], match: str | None):
  cd = with_overrides(spec, overrides)
  if match is not None:
    cd = matched_dense(cd, on=match)
  experiment_from_config_dict(cd)  # Validates: bad input is refused before anything runs.
  return cd


def plan(
    specs: Sequence[str],
    *,
    seeds: Sequence[int],
    root: str | pathlib.Path,
    baselines: Sequence[str] = (),
    overrides: Sequence[str] = (),
) -> list[Run]:
  """Every run of a sweep, configs in order with their baselines, then seeds; validated.

  A baseline shared by several configs (two sparse configs with the same name) is planned once; two
  different configs with the same name are refused.
  """
  runs, owner = [], {}
  for spec in (s for given in specs for s in expand(given)):
    sparse = _configured(spec, overrides, None)
    if sparse.model.moe is None and baselines:
      raise ValueError(
          f"--baselines: {spec} is a dense config; baselines are matched to sparse models"
      )
    for match in (None, *baselines):
      cd = sparse if match is None else _configured(spec, overrides, match)
      key = (spec, match)
      if owner.setdefault(cd.name, key) != key:
        raise ValueError(
            f"two runs are named {cd.name!r} ({owner[cd.name][0]} and {spec}): give them distinct"
            " names (--set name=...) or sweep them into different roots"
        )
      for seed in seeds:
        workdir = pathlib.Path(root) / cd.name / f"seed{seed}"
        runs.append(
            Run(
                name=cd.name,
                seed=int(seed),
                spec=spec,
                overrides=tuple(overrides),
                match=match,
                baseline_of=None if match is None else sparse.name,
                workdir=str(workdir),
                steps=int(cd.train.steps),
            )
        )
  _refuse_shared_workdirs(runs)
  return runs


def _refuse_shared_workdirs(runs: list[Run]) -> None:
  """Two runs of a plan in one workdir would train over each other (a seed given twice)."""
  seen = set()
  for run in runs:
    if run.workdir in seen:
      raise ValueError(
          f"two runs of the plan share the workdir {run.workdir} ({run.name} seed {run.seed}): "
          "give each seed once (--seeds)"
      )
    seen.add(run.workdir)


def is_complete(run: Run) -> bool:
  """Whether the run's final checkpoint has committed and its final records are written
  (`moe.trainer.workdir.is_complete`): a run stopped in its final save is redone."""
  return workdir_lib.is_complete(run.workdir, run.steps)


def write_manifest(root: str | pathlib.Path, runs: Iterable[Run]) -> None:
  """Adds the runs to `<root>/sweep.json` (kept by workdir: a sweep can grow by more seeds/configs)."""
  path = pathlib.Path(root) / MANIFEST
  known = {r["workdir"]: r for r in read_manifest(root)}
  known.update({r.workdir: dataclasses.asdict(r) for r in runs})
  atomic_file.atomic_write(path, json.dumps(list(known.values()), indent=1) + "\n")


def read_manifest(root: str | pathlib.Path) -> list[dict]:
  """The runs recorded in `<root>/sweep.json` (none: [])."""
  path = pathlib.Path(root) / MANIFEST
  return run_records.read_json(path) if path.exists() else []


class ReuseError(ValueError):
  """The source cannot stand for the new config's run."""


def reuse(source: pathlib.Path, workdir: pathlib.Path, spec: str, overrides=()) -> dict:
  """Copies the complete run in `source` to `workdir` as a run of `spec` (the same model, data and
  schedule under another name; `research.reuse_run`); returns the new config.json."""
  config_path = source / workdir_lib.CONFIG
  if not config_path.exists():
    raise ReuseError(f"reuse_run: {source} holds no run ({workdir_lib.CONFIG} is missing)")
  old = json.loads(config_path.read_text())
  seeded = [*overrides, f"train.seed={old['train']['seed']}"]
  new = to_json(experiment_from_config_dict(with_overrides(spec, seeded)))
  differences = workdir_lib.config_differences(old, new, resumable=("name",))
  if differences:
    raise ReuseError(f"reuse_run: {source} is not a run of {spec}: " + "; ".join(differences))
  if not workdir_lib.is_complete(source, old["train"]["steps"]):
    raise ReuseError(f"reuse_run: {source} is not complete")
  if workdir.exists():
    raise ReuseError(f"reuse_run: {workdir} exists: it is never overwritten")
  # Not `seed*`: a copy cut short is never listed as a run (`research.statistics.load_runs`).
  partial = workdir.with_name(f".{workdir.name}.partial")
  shutil.rmtree(partial, ignore_errors=True)
  shutil.copytree(source, partial, ignore=shutil.ignore_patterns(workdir_lib.LOCK))
  atomic_file.atomic_write(
      partial / workdir_lib.CONFIG, json.dumps(new, indent=2, sort_keys=True) + "\n"
  )
  partial.rename(workdir)
  return new
