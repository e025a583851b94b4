"""A run's directory: its config (and the history of resumable changes to it) and its metrics files.

Layout:
    config.json            the resolved config of the latest launch (`moe.config.config_dict.to_json`)
    config_history.jsonl   one line per launch that changed a resumable field: the changes and the
                           whole previous config (so e.g. the original schedule of an extended run stays
                           on record)
    checkpoints/<s>/       orbax (`moe.trainer.checkpoints`)
    metrics.jsonl          one JSON object per line, split 'train' or 'eval'; per sparse layer lists;
                           strict JSON: NaN and infinities as the strings "NaN", "Infinity",
                           "-Infinity" (`read_metrics` reads them back as floats)
    tensorboard/           tensorboardX event files (scalars; per-layer values as separate tags)

A workdir whose config.json matches the config restarts from its latest checkpoint; the fields in
`RESUMABLE_FIELDS` may differ (see there), `train.steps` only with `train.allow_steps_change`; any other
difference is refused unless `train.overwrite`. A relaunch with an identical config writes nothing here.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import shutil
from typing import Any

import jax
from absl import logging

from moe import atomic_file
from moe.config.config_dict import to_json
from moe.config.data import DataConfig
from moe.config.experiment import ExperimentConfig
from moe.config.mesh import MeshConfig
from moe.config.model import ModelConfig, MoEConfig
from moe.config.train import TrainConfig

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
METRICS = "metrics.jsonl"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


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
    raise WorkdirError(
        f"workdir {workdir} cannot be written ({error.strerror or error}): use another --workdir"
    ) from error


def _prepare(cfg: ExperimentConfig, workdir: pathlib.Path) -> None:
  """Checks that `workdir` is empty or holds a run of `cfg`, then records the config. Process 0 only.

  A run with a different config is refused (with every differing field), unless `train.overwrite`,
  which deletes its checkpoints, metrics and history first. Changes of resumable fields are appended to
  config_history.jsonl with the previous config before config.json is replaced.
  """
  new = to_json(cfg)
  config_path = workdir / CONFIG
  old = json.loads(config_path.read_text()) if config_path.exists() else None
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
    for p in (
        workdir / "checkpoints",
        workdir / METRICS,
        workdir / "tensorboard",
        workdir / HISTORY,
    ):
      if p.is_dir():
        shutil.rmtree(p)
      elif p.exists():
        p.unlink()
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


# metrics.jsonl is strict JSON (which has no NaN or infinities): a non-finite number is written as
# one of these strings, and `read_metrics` turns it back into a float.
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_safe(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def _from_json_safe(value: Any) -> Any:
  if isinstance(value, str) and value in _NONFINITE:
    return _NONFINITE[value]
  if isinstance(value, list):
    return [_from_json_safe(v) for v in value]
  return value


def metrics_line(record: dict) -> str:
  """One metrics.jsonl line: strict JSON, non-finite numbers as "NaN", "Infinity", "-Infinity"."""
  return json.dumps(_json_safe(record), allow_nan=False) + "\n"


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl, non-finite values as floats again (a torn last line, from a crash
  mid-write, is skipped)."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    records.append({k: _from_json_safe(v) for k, v in record.items()})
  return records


class MetricsWriter:
  """metrics.jsonl (append-only lines) and TensorBoard scalars; a no-op off process 0."""

  def __init__(self, workdir: pathlib.Path, start_step: int, sparse_layers: list[int]):
    self.active = jax.process_index() == 0
    self.path = workdir / METRICS
    self.sparse_layers = sparse_layers
    self.tb = None
    self._tb_dir, self._start = workdir / "tensorboard", start_step
    if not self.active:
      return
    # Records after the checkpoint we resume from (a crash wrote them) are dropped, and a torn last
    # line with them; a relaunch of a finished run leaves the file untouched.
    kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
    text = "".join(metrics_line(r) for r in kept)
    if text != (self.path.read_text() if self.path.exists() else ""):
      atomic_file.atomic_write(self.path, text)

  def _tensorboard(self):
    if self.tb is None:  # Opened on the first record: a run with nothing to log writes nothing.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      # purge_step hides events a crashed run wrote after the checkpoint we resume from.
      self.tb = SummaryWriter(str(self._tb_dir), purge_step=self._start + 1)
    return self.tb

  def write(self, record: dict) -> None:
    if not self.active:
      return
    tb = self._tensorboard()
    with open(self.path, "a") as f:
      f.write(metrics_line(record))  # One write per line: a crash can only tear the last line.
    step, split = record["step"], record["split"]
    for key, value in record.items():
      if key in ("step", "split"):
        continue
      if isinstance(value, (int, float)):
        tb.add_scalar(f"{split}/{key}", value, step)
        continue
      for layer, per_layer in zip(self.sparse_layers, value):
        if isinstance(per_layer, list):
          sub = "rank" if key == "dropped_fraction" else "expert"
          for i, v in enumerate(per_layer):
            tb.add_scalar(f"{split}/{key}/layer{layer}/{sub}{i}", v, step)
        else:
          tb.add_scalar(f"{split}/{key}/layer{layer}", per_layer, step)
    tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
