"""Sweeps: a set of configs times a set of seeds, one workdir each, with matched dense baselines.

    runs = plan(["configs/ablations.py:family=experts"], seeds=(0, 1, 2), root="runs/sweeps/experts",
                baselines=("active_flops",), overrides=("train.steps=2000",))
    for run in runs: print(run.shell_command())

A run is one `python -m experiments.train` command, so a sweep runs the same way on this machine, on a
cluster scheduler (`research.sweep --dry_run` prints the commands) or by hand. Its workdir is
`<root>/<config name>/seed<N>`; rerunning a command resumes the run from its checkpoint, and a run
whose workdir holds the final evaluation is complete (`is_complete`) and is skipped.

A config spec is `path[:arg]` as `experiments.train --config` takes it. A config file that defines
`sweep(arg) -> list of arg strings` expands into several configs (`configs/ablations.py` without a
`member=` expands to every member of its family). A baseline is the sparse config's command with
`--match_dense=<measure>` (`research.baselines.matched_dense`): the dense model of that exact config.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
import shlex
import sys
from typing import Iterable, Sequence

import ml_collections

from moe import atomic_file
from moe.config.config_dict import experiment_from_config_dict
from moe.trainer.workdir import METRICS, read_metrics
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
  module = _load_module(spec.partition(":")[0])
  arg = spec.partition(":")[2]
  return module.get_config(arg) if arg else module.get_config()


def _load_module(path: str):
  if not pathlib.Path(path).is_file():
    raise ValueError(f"--config: no config file {path!r}")
  name = f"_sweep_config_{pathlib.Path(path).stem}"
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module  # Registered before it runs: dataclasses look their module up.
  module_spec.loader.exec_module(module)
  return module


def expand(spec: str) -> list[str]:
  """The config specs a spec stands for: its file's `sweep(arg)`, else the spec itself."""
  path, _, arg = spec.partition(":")
  module = _load_module(path)
  if not hasattr(module, "sweep"):
    return [spec]
  return [f"{path}:{a}" if a else path for a in module.sweep(arg)]


def apply_override(cd: ml_collections.ConfigDict, override: str) -> None:
  """Sets `field.path=value` on `cd` (the value read as a Python literal, else as a string)."""
  key, sep, text = override.partition("=")
  if not sep:
    raise ValueError(f"--set {override!r}: expected field.path=value")
  *parents, leaf = key.split(".")
  node = cd
  for part in parents:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"--set {key}: no such config field")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ValueError(f"--set {key}: no such config field")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  try:
    node[leaf] = value
  except TypeError as error:
    raise ValueError(f"--set {key}={text}: {error}") from None


def config_of(run: Run) -> ml_collections.ConfigDict:
  """The ConfigDict a run trains (what its command builds), for running it in this process."""
  cd = _configured(run.spec, run.overrides, run.match)
  cd.train.seed = run.seed
  return cd


def _configured(spec: str, overrides: Sequence[str], match: str | None):
  cd = load_config(spec)
  for override in overrides:
    apply_override(cd, override)
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
  return runs


def is_complete(run: Run) -> bool:
  """Whether the run's workdir holds its final evaluation (the loop writes it last)."""
  return holds_final_eval(run.workdir, run.steps)


def holds_final_eval(workdir: str | pathlib.Path, steps: int) -> bool:
  """Whether `workdir`'s metrics hold the evaluation at step `steps`."""
  records = read_metrics(pathlib.Path(workdir) / METRICS)
  return any(r.get("split") == "eval" and r.get("step") == steps for r in records)


def write_manifest(root: str | pathlib.Path, runs: Iterable[Run]) -> None:
  """Adds the runs to `<root>/sweep.json` (kept by workdir: a sweep can grow by more seeds/configs)."""
  path = pathlib.Path(root) / MANIFEST
  known = {r["workdir"]: r for r in read_manifest(root)}
  known.update({r.workdir: dataclasses.asdict(r) for r in runs})
  atomic_file.atomic_write(path, json.dumps(list(known.values()), indent=1) + "\n")


def read_manifest(root: str | pathlib.Path) -> list[dict]:
  """The runs recorded in `<root>/sweep.json` (none: [])."""
  path = pathlib.Path(root) / MANIFEST
  return json.loads(path.read_text()) if path.exists() else []
