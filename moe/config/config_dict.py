"""The bridge between ml_collections ConfigDicts (config files, command-line overrides) and the frozen
config dataclasses (`moe.config`, `moe.parallel.sharding.MeshConfig`, `moe.data.DataConfig`).

Each default is written once, as a dataclass default: `section(cls, **values)` builds a ConfigDict
section with every field of `cls`, its default unless given, and its type (a field whose value is None
holds a typed placeholder), so any override such as `--config.model.num_kv_heads=2` or
`--config.model.moe.group_size=512` works. `experiment_from_config_dict` is the other direction and the
one place where a ConfigDict becomes validated dataclasses. `to_json` is what a workdir's config.json
holds.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from moe.config.data import DataConfig
from moe.config.experiment import ExperimentConfig
from moe.config.mesh import MeshConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig

_REQUIRED = object()


def _field_type(hint: Any) -> type:
  """The ConfigDict type of a field from its annotation: `float | None` -> float, an enum -> str,
  `tuple[int, ...] | None` -> tuple."""
  options = [t for t in typing.get_args(hint) if t is not type(None)]
  if typing.get_origin(hint) not in (typing.Union, types.UnionType):
    options = [hint]
  kind = typing.get_origin(options[0]) or options[0]
  if isinstance(kind, type) and issubclass(kind, enum.Enum):
    return str
  return kind


def section(cls: type, **values: Any) -> ml_collections.ConfigDict:
  """A ConfigDict section with every field of dataclass `cls`: `values`, else the field's default.

  Args:
    cls: a config dataclass (`ModelConfig`, `MoEConfig`, `TrainConfig`, `DataConfig`, `MeshConfig`).
    **values: field values; required (default-less) fields must be given. Enum members are stored as
      their string values, an int given to a float field as a float (so a later override of 1.25 is
      accepted), and None as a placeholder of the field's type.

  Raises:
    ValueError: an unknown field, or a required field missing.
  """
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
        f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; " f"allowed: {', '.join(fields)}"
    )
  out = {}
  for name, field in fields.items():
    value = values.get(name, field.default)
    if value is dataclasses.MISSING:
      raise ValueError(f"{cls.__name__}: field {name} has no default and must be given")
    kind = _field_type(hints[name])
    if isinstance(value, enum.Enum):
      value = value.value
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif isinstance(value, tuple):
      value = list(value)  # ConfigDict stores sequences as given; lists print and override cleanly.
    if value is None and not dataclasses.is_dataclass(kind):
      value = config_dict.placeholder(kind)
    out[name] = value
  return ml_collections.ConfigDict(out)


def from_dict(cls, values: Any, prefix: str):
  """Builds dataclass `cls` from a mapping (a ConfigDict section), naming unknown fields."""
  if isinstance(values, cls):
    return values
  values = dict(values.items() if hasattr(values, "items") else values)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(
        f"{prefix}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(names)}"
    )
  return cls(**values)


def model_from_config_dict(model_section) -> ModelConfig:
  """The `model` section of a ConfigDict (with `moe` a section or None) as a validated ModelConfig."""
  model = dict(model_section.items())
  if model.get("moe") is not None:
    model["moe"] = from_dict(MoEConfig, model["moe"], "config.model.moe")
  return from_dict(ModelConfig, model, "config.model")


def experiment_from_config_dict(cd) -> ExperimentConfig:
  """The one place where an ml_collections ConfigDict becomes frozen, validated dataclasses.

  Layout: `name`, `model` (ModelConfig fields, with `model.moe` a MoEConfig section or None),
  `train` (TrainConfig), `data` (DataConfig) and optionally `mesh` (MeshConfig; absent: every device
  on the data axis).
  """
  mesh = cd.get("mesh")
  return ExperimentConfig(
      name=str(cd.get("name", "run")),
      model=model_from_config_dict(cd.model),
      train=from_dict(TrainConfig, cd.train, "config.train"),
      data=from_dict(DataConfig, cd.data, "config.data"),
      mesh=MeshConfig() if mesh is None else from_dict(MeshConfig, mesh, "config.mesh"),
  )


def to_json(cfg: Any) -> dict:
  """A config dataclass as JSON-ready nested dicts (enums as values, tuples as lists)."""

  def convert(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, enum.Enum):
      return x.value
    if isinstance(x, dict):
      return {str(k): convert(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [convert(v) for v in x]
    return x

  return json.loads(json.dumps(convert(cfg)))
