"""Config files and `--config.<field>=value` overrides, read exactly as `experiments.train` reads them.

    cd = from_command_line("configs/switch.py:size=smoke", ["train.steps=20", "model.moe=None"])

A config file is `path[:arg]`; its `get_config(arg)` returns the experiment's ConfigDict.
ml_collections' `config_flags` loads it and parses each override by the field's type; this module adds
what it lacks: `None` for every optional field (`--config.model.moe.train_capacity_factor=None`, the
dropless value; `--config.model.moe=None`, dense), and one line naming the file and the cause for every
way a config file can fail (missing, a syntax error, `get_config` missing or raising) or an override
can (no such field, a value of the wrong type). `research.sweep` validates its `--set` values here, so
what it accepts is what the runs it launches accept.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
import types
import typing
from typing import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from moe.config.data import DataConfig
from moe.config.mesh import MeshConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig

# The ConfigDict's sections and the dataclass each one becomes (`config_dict.experiment_from_config_dict`).
_SECTIONS = {
    "model": ModelConfig,
    "model.moe": MoEConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
}


def load_module(path: str) -> types.ModuleType:
  """A config file as a module; one-line ValueError naming the file if it is missing or does not run."""
  if not path:
    raise ValueError("--config is empty: give a config file, path[:arg]")
  if not pathlib.Path(path).is_file():
    raise ValueError(f"{path}: no such config file")
  name = f"_moe_config_{pathlib.Path(path).stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # Registered before it runs: dataclasses look their module up.
  try:
    spec.loader.exec_module(module)
  except SyntaxError as error:
    raise ValueError(f"{path}: syntax error at line {error.lineno}: {error.msg}") from error
  except Exception as error:  # pylint: disable=broad-except  # Whatever the file raised.
    raise ValueError(f"{path}: raised {type(error).__name__}: {error}") from error
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path}: defines no get_config(arg) function: not a config file")
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `path[:arg]` (no arg: `get_config()`), with one-line errors (`load_module`)."""
  path, colon, arg = spec.partition(":")
  module = load_module(path)
  call = f"get_config({arg!r})" if colon else "get_config()"
  try:
    cd = module.get_config(arg) if colon else module.get_config()
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"{path}: {call} raised {type(error).__name__}: {error}") from error
  if not isinstance(cd, ml_collections.ConfigDict):
    raise ValueError(f"{path}: {call} returned {type(cd).__name__}, not a ConfigDict")
  return cd


def accepts_none(field: str) -> bool:
  """Whether the dotted config field (e.g. "model.moe.group_size") is optional in its dataclass."""
  section, _, name = field.rpartition(".")
  cls = _SECTIONS.get(section)
  hint = typing.get_type_hints(cls).get(name) if cls is not None else None
  return hint is not None and type(None) in typing.get_args(hint)


def split_none(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv without its `--config.<field>=None` of optional fields, those fields): config_flags parses
  a field by its type (float("None") fails), so these are set after parsing (`set_none`)."""
  rest, fields = [], []
  for arg in argv:
    match = re.fullmatch(r"--config\.([\w.]+)=None", arg)
    if match and accepts_none(match.group(1)):
      fields.append(match.group(1))
    else:
      rest.append(arg)
  return rest, fields


def set_none(cd: ml_collections.ConfigDict, fields: Sequence[str]) -> None:
  for field in fields:
    *parents, leaf = field.split(".")
    node = cd
    for part in parents:
      node = node[part]
    node[leaf] = None


def parse(parse_flags: Callable[[list[str]], list[str]], argv: list[str]) -> list[str]:
  """`parse_flags(argv)` (absl flag parsing) with every failure as one-line ValueError.

  The config file is loaded first by `load_config`, whose errors name the file (absl's quote two
  tracebacks, or defer a missing file until the value is read).
  """
  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if specs:
    load_config(specs[-1])  # The last one given is absl's value.
  try:
    return parse_flags(argv)
  except flags.Error as error:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # A config file that raised: its exception is the last line of the traceback absl quotes.
    traced = any("Traceback" in line for line in lines)
    message = f"{lines[0]} {lines[-1]}" if traced else " ".join(lines)
  except (AttributeError, KeyError) as error:  # A --config. override naming no field.
    text = str(error).replace("\\n", " ").replace("\\'", "")
    key = re.search(r"(\w+)", text).group(1)
    given = next(
        (a.split("=")[0] for a in argv if re.match(rf"--config\.(\w+\.)*{key}[.=]", a)), key
    )
    hint = re.search(r'Did you mean "\w+"', text)
    message = f"{given}: no such config field" + (f". {hint.group(0)}?" if hint else "")
  raise ValueError(message)


def from_command_line(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The ConfigDict of `--config=spec --config.<override>...`, parsed by config_flags as
  `experiments.train` parses them (`None` included).

  Raises:
    ValueError: one line (`parse`); an override's own text follows `--config.`.
  """
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values)
  argv, nones = split_none(["-", f"--config={spec}", *(f"--config.{o}" for o in overrides)])
  given, sys.argv = sys.argv, argv  # config_flags finds the overrides in sys.argv, not in argv.
  try:
    parse(values, argv)
  finally:
    sys.argv = given
  cd = holder.value
  set_none(cd, nones)
  return cd
