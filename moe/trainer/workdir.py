"""A run's directory: its config (and the history of resumable changes to it) and its metrics files.

Layout:
    config.json            the resolved config of the latest launch (`moe.config.config_dict.to_json`)
    config_history.jsonl   one line per launch that changed a resumable field: the changes and the
                           whole previous config (so e.g. the original schedule of an extended run stays
                           on record)
    checkpoints/<s>/       orbax (`moe.trainer.checkpoints`)
    metrics.jsonl          one JSON object per line, split 'train' or 'eval'; per sparse layer lists;
                           strict JSON: NaN and infinities as the strings "NaN", "Infinity",
                           "-Infinity" (`moe.trainer.run_records` reads them back as floats; reports write them
                           the same way)
    metrics.malformed.jsonl  lines of metrics.jsonl that were not records (garbage, null, a torn last
                           line), moved here by the next start with a warning naming their numbers
    tensorboard/           tensorboardX event files (scalars; per-layer values as separate tags)
    lock                   the pid and host of the run holding the workdir (`locked`)
    checkpointed           the newest step known committed: a workdir whose checkpoints are then gone
                           while its metrics remain is refused, never restarted over them

A workdir whose config.json matches the config restarts from its latest checkpoint; the fields in
`RESUMABLE_FIELDS` may differ (see there), `train.steps` only with `train.allow_steps_change`; any other
difference is refused unless `train.overwrite`. A relaunch with an identical config writes nothing but
its lock file. A run is complete when its final checkpoint has committed (`is_complete`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import shutil
import socket
from typing import Any

from absl import logging
from flax import traverse_util

from moe import atomic_file
from moe.config.config_dict import to_json
from moe.config.data import DataConfig
from moe.config.experiment import ExperimentConfig
from moe.config.mesh import MeshConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig
from moe.trainer import checkpoints
from moe.trainer.run_records import MALFORMED, METRICS, read_json, read_metrics

# Fields that may differ between a run in a workdir and the config that resumes it. None of them
# changes the optimisation trajectory: logging/evaluation/checkpoint periods, the MFU peak, the
# overwrite and allow_steps_change flags, the run's display name, cache locations and the mesh (routing
# groups come from the data, never from the device layout, so a run may resume on a different number of
# devices; sums are then reordered, so equal up to rounding). `train.eval_batches` may not change: eval
# numbers of the two halves of a run would not be comparable. `train.steps` changes the schedule (a
# cosine decays over it): see `STEPS_FIELD`.
RESUMABLE_FIELDS = (
    "name",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.peak_flops_per_device",
    "train.overwrite",
    "train.allow_steps_change",
    "data.cache_dir",
    "data.tfds_data_dir",
    "mesh",
)
# Resumable only with train.allow_steps_change=True, an explicit choice that is recorded.
STEPS_FIELD = "train.steps"
CONFIG = "config.json"
HISTORY = "config_history.jsonl"
LOCK = "lock"
CHECKPOINTED = "checkpointed"


def _flatten(tree: dict) -> dict[str, Any]:
  """{"a.b": leaf}; an empty section is a leaf {} (so adding its first field is a difference)."""
  flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True, sep=".")
  return {k: {} if v is traverse_util.empty_node else v for k, v in flat.items()}


def config_differences(old: dict, new: dict, resumable: tuple[str, ...] = ()) -> list[str]:
  """'field: old -> new' for every dotted field that differs between two `to_json` dicts, except the
  fields (or sections) named in `resumable`."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  skip = lambda key: any(key == f or key.startswith(f + ".") for f in resumable)
  missing = object()
  return [
      f"{key}: {old_flat.get(key, missing)!r} -> {new_flat.get(key, missing)!r}".replace(
          repr(missing), "<absent>"
      )
      for key in sorted(set(old_flat) | set(new_flat))
      if not skip(key) and old_flat.get(key, missing) != new_flat.get(key, missing)
  ]


# Fields that runs recorded before they existed behaved differently from today's default: their
# absence from a recorded config means this value (runs scored the split's prefix before
# `train.eval_windows` existed).
_VALUE_BEFORE_FIELD = {"train.eval_windows": "prefix"}


def _fields_added_at_default(old: dict, new: dict) -> tuple[str, ...]:
  """Dotted fields absent from a recorded config and, in `new`, at the value the run had before the
  field existed (its default, or `_VALUE_BEFORE_FIELD`): resuming with it is no change."""
  sections = {
      "train": TrainConfig,
      "model": ModelConfig,
      "model.moe": MoEConfig,
      "data": DataConfig,
      "mesh": MeshConfig,
  }
  recorded, current = _flatten(old), _flatten(new)
  return tuple(
      key
      for prefix, cls in sections.items()
      for field in dataclasses.fields(cls)
      if field.default is not dataclasses.MISSING
      and (key := f"{prefix}.{field.name}") not in recorded
      and key in current
      and current[key] == _VALUE_BEFORE_FIELD.get(key, to_json({"v": field.default})["v"])
  )


def _refusal(
    cfg: ExperimentConfig, old: dict | None, new: dict, workdir: pathlib.Path
) -> list[str]:
  """Why the run in `workdir` cannot be resumed with `cfg` (empty: it can)."""
  if old is None:
    outputs = [workdir / "checkpoints", workdir / METRICS, workdir / "tensorboard"]
    if any(p.exists() for p in outputs):
      return ["config.json is missing but the workdir holds checkpoints or metrics"]
    return []
  allowed = RESUMABLE_FIELDS + (STEPS_FIELD,) + _fields_added_at_default(old, new)
  refused = config_differences(old, new, allowed)
  old_steps = _flatten(old).get(STEPS_FIELD)
  if old_steps != cfg.train.steps and not cfg.train.allow_steps_change:
    refused.append(
        f"{STEPS_FIELD}: {old_steps!r} -> {cfg.train.steps!r} (changes the learning-rate "
        "schedule of the run; set train.allow_steps_change=True to extend or shorten it)"
    )
  return refused


class WorkdirError(ValueError):
  """The workdir cannot be used: another run's, or not writable."""


def prepare_workdir(cfg: ExperimentConfig, workdir: pathlib.Path) -> None:
  """`_prepare`, with a filesystem error said as what it is: the workdir cannot be written."""
  try:
    _prepare(cfg, workdir)
  except OSError as error:
    raise _unwritable(workdir, error) from error


def _unwritable(workdir: pathlib.Path, error: OSError) -> WorkdirError:
  return WorkdirError(
      f"workdir {workdir} cannot be written ({error.strerror or error}): use another --workdir"
  )


def _prepare(cfg: ExperimentConfig, workdir: pathlib.Path) -> None:
  """Checks that `workdir` is empty or holds a run of `cfg`, then records the config. Process 0 only.

  A run with a different config is refused (with every differing field), unless `train.overwrite`,
  which deletes its checkpoints, metrics and history first. Changes of resumable fields are appended to
  config_history.jsonl with the previous config before config.json is replaced.
  """
  new = to_json(cfg)
  config_path = workdir / CONFIG
  old = read_json(config_path) if config_path.exists() else None
  refused = _refusal(cfg, old, new, workdir)
  if refused:
    if not cfg.train.overwrite:
      raise WorkdirError(
          f"workdir {workdir} holds a run with a different config:\n  "
          + "\n  ".join(refused)
          + "\nUse another --workdir, or set train.overwrite=True to delete its checkpoints and metrics "
          f"(fields that may differ on resume: {', '.join(RESUMABLE_FIELDS)})."
      )
    logging.warning("train.overwrite: clearing %s (%s)", workdir, "; ".join(refused))
    _clear(workdir)
    old = None
  if old == new:
    return  # Nothing to record: a plain resume leaves the workdir as it was.
  workdir.mkdir(parents=True, exist_ok=True)
  if old is not None:
    change = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "changes": config_differences(old, new),
        "previous": old,
    }
    with open(workdir / HISTORY, "a") as f:
      f.write(json.dumps(change) + "\n")
  atomic_file.atomic_write(config_path, json.dumps(new, indent=2, sort_keys=True) + "\n")


_OUTPUTS = ("checkpoints", METRICS, MALFORMED, "tensorboard", HISTORY, CHECKPOINTED)


def _clear(workdir: pathlib.Path, names: tuple[str, ...] = _OUTPUTS) -> None:
  """Deletes a run's outputs (train.overwrite), keeping the lock and config.json."""
  for name in names:
    p = workdir / name
    if p.is_dir():
      shutil.rmtree(p)
    elif p.exists():
      p.unlink()


@contextlib.contextmanager
def locked(workdir: pathlib.Path):
  """Holds an exclusive lock on `workdir` (its `lock` file) for the block: a second run on the same
  workdir is refused. The lock is the OS's (flock): it goes with the process, kill -9 included, so a
  stale lock file never blocks a rerun. The file stays (removing it would race a new holder). A
  read-only workdir (a finished run relaunched from archived storage) is locked through a read-only
  handle, without a holder's name, or not at all when it has no lock file: nothing can write there.

  Raises:
    WorkdirError: another process holds it (the message names its pid and host), or the workdir
      cannot be created.
  """
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise _unwritable(workdir, error) from error
  try:
    f = open(workdir / LOCK, "a+")  # pylint: disable=consider-using-with  # Held by the block.
  except OSError:
    if not (workdir / LOCK).exists():
      yield
      return
    f = open(workdir / LOCK)  # pylint: disable=consider-using-with
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise WorkdirError(
          f"workdir {workdir} is in use by {holder} (it holds {workdir / LOCK}): wait for that "
          "run to end, or use another --workdir"
      ) from None
    if f.writable():
      f.truncate(0)
      f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
      f.flush()
    yield


def note_checkpoint(workdir: pathlib.Path, step: int) -> None:
  """Records that checkpoint `step` has committed (`checkpoints_lost` reads it)."""
  path = workdir / CHECKPOINTED
  if not path.exists() or path.read_text().strip() != str(step):
    atomic_file.atomic_write(path, f"{step}\n")


def checkpoints_lost(workdir: pathlib.Path) -> str | None:
  """Why `workdir` once held a checkpoint, or None: call it before its checkpoints/ is (re)created and
  when none restores. A run killed before its first checkpoint committed leaves neither sign."""
  if (workdir / CHECKPOINTED).exists():
    return f"checkpoint {(workdir / CHECKPOINTED).read_text().strip()} had committed"
  if (workdir / METRICS).exists() and not (workdir / "checkpoints").exists():
    return "its checkpoints/ directory is gone"
  return None


def refuse_lost_history(cfg: ExperimentConfig, workdir: pathlib.Path, lost: str) -> None:
  """A run whose checkpoints are gone while its metrics remain: refused (it would restart from step 0
  over its history), or cleared when `train.overwrite`. Process 0, before the metrics are opened.

  Raises:
    WorkdirError: the refusal, naming what is left and the two ways on.
  """
  records = read_metrics(workdir / METRICS)
  if not records:
    return
  last = max(r.get("step", 0) for r in records)
  if not cfg.train.overwrite:
    raise WorkdirError(
        f"workdir {workdir}: {lost} but no checkpoint is left in checkpoints/, while "
        f"{METRICS} holds {len(records)} records up to step {last}: refusing to restart from step "
        "0 over them. Put the checkpoints back, or set train.overwrite=True to start over"
    )
  logging.warning("train.overwrite: clearing %s (%s, no checkpoint left)", workdir, lost)
  _clear(workdir, (METRICS, MALFORMED, "tensorboard", CHECKPOINTED))


def is_complete(workdir: str | os.PathLike, steps: int) -> bool:
  """Whether the run in `workdir` is complete at `steps`: its final checkpoint has committed (orbax
  lists a step only once committed) and its metrics hold the final train record, and the final
  evaluation unless its config.json sets train.eval_batches=0. The loop writes the records first,
  then the checkpoint: a run stopped during its final save is not complete."""
  workdir = pathlib.Path(workdir)
  if steps not in checkpoints.steps_of(workdir):
    return False
  final = {r.get("split") for r in read_metrics(workdir / METRICS) if r.get("step") == steps}
  try:
    evaluates = read_json(workdir / CONFIG)["train"].get("eval_batches") != 0
  except (ValueError, KeyError, TypeError):
    evaluates = True
  return "train" in final and ("eval" in final or not evaluates)
