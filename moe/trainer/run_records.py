"""A run's records: strict JSON for everything a run or a report writes, and metrics.jsonl (one
record per line, split 'train' or 'eval', per sparse layer lists) with its TensorBoard mirror.

Non-finite numbers are the strings "NaN", "Infinity", "-Infinity" (JSON has none), read back as
floats. A line of metrics.jsonl that is not a record (garbage, null, a line torn by a crash) is moved
to metrics.malformed.jsonl with a warning naming its number, never dropped silently.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax
from absl import logging

from moe import atomic_file

METRICS = "metrics.jsonl"
MALFORMED = "metrics.malformed.jsonl"

# Strict JSON (which has no NaN or infinities) everywhere a run or a report writes: a non-finite number
# is one of these strings, and `from_json_safe` turns it back into a float. (null is read as None:
# "no value", which reports written before this convention used for NaN.)
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_safe(value: Any) -> Any:
  """`value` with its non-finite floats as "NaN", "Infinity", "-Infinity" (nested dicts and lists)."""
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def from_json_safe(value: Any) -> Any:
  """The inverse of `json_safe`: "NaN", "Infinity", "-Infinity" as floats again."""
  if isinstance(value, str) and value in _NONFINITE:
    return _NONFINITE[value]
  if isinstance(value, dict):
    return {k: from_json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [from_json_safe(v) for v in value]
  return value


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file (config.json, sweep.json, a report) as written (`from_json_safe` restores floats).

  Raises:
    ValueError: one line naming the file and why it is unreadable (missing, not JSON).
  """
  try:
    text = pathlib.Path(path).read_text()
  except OSError as error:
    raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(
        f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    ) from None


def metrics_line(record: dict) -> str:
  """One metrics.jsonl line: strict JSON, non-finite numbers as "NaN", "Infinity", "-Infinity"."""
  return json.dumps(json_safe(record), allow_nan=False) + "\n"


def read_metrics_lines(path: pathlib.Path) -> tuple[list[dict], list[tuple[int, str]]]:
  """(records, malformed) of a metrics.jsonl: every line that is a JSON object, in order, non-finite
  values as floats; and (line number from 1, text) of every other line (garbage, `null`, a line torn
  by a crash mid-write)."""
  if not path.exists():
    return [], []
  records, malformed = [], []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict):
      records.append(from_json_safe(record))
    else:
      malformed.append((number, line))
  return records, malformed


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl (`read_metrics_lines`), without its malformed lines."""
  return read_metrics_lines(path)[0]


def _set_aside_malformed(path: pathlib.Path, malformed: list[tuple[int, str]]) -> None:
  """Appends malformed lines to metrics.malformed.jsonl, as {"line": n, "text": ...}, and says so."""
  aside = path.with_name(MALFORMED)
  with open(aside, "a") as f:
    for number, text in malformed:
      f.write(json.dumps({"line": number, "text": text}) + "\n")
  logging.warning(
      "%s: line(s) %s are not JSON records (a crash mid-write, or an edit); moved to %s",
      path,
      ", ".join(str(n) for n, _ in malformed),
      aside,
  )


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
    # Records after the checkpoint we resume from (a crash wrote them) are dropped; lines that are not
    # records are moved aside with a warning; a relaunch of a finished run leaves the file untouched.
    records, malformed = read_metrics_lines(self.path)
    if malformed:
      _set_aside_malformed(self.path, malformed)
    kept = [r for r in records if r.get("step", 0) <= start_step]
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
    try:
      with open(self.path, "a") as f:
        f.write(metrics_line(record))  # One write per line: a crash can only tear the last line.
    except OSError as error:
      raise atomic_file.naming(error, self.path)
    try:
      self._add_scalars(tb, record)
    except OSError as error:
      raise atomic_file.naming(error, self._tb_dir)

  def _add_scalars(self, tb, record: dict) -> None:
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
