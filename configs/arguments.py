"""The argument string of a config file: `--config=configs/switch.py:size=tiny,experts=16`.

Each config file declares its keys with `Arg` and reads them with `parse_arg` (big_vision style), so a
typo in a key or a value fails with the allowed keys or values before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from configs.sizes import DATA, SIZES
from moe.config.enums import Dispatch
from moe.config.layer import MoEConfig


@dataclasses.dataclass(frozen=True)
class Arg:
  """One key of a config's argument string.

  Attributes:
    default: the value when the key is absent.
    choices: the allowed string values (None: any value of `kind`).
    kind: str, int or float: how the value is parsed.
    minimum: the smallest allowed number (int and float kinds).
  """

  default: Any
  choices: tuple[str, ...] | None = None
  kind: type = str
  minimum: float | None = None


SIZE_ARG = Arg("tiny", tuple(SIZES))
DATA_ARG = Arg("shakespeare", tuple(DATA))
# The layer's own default (MoEConfig.dispatch), not a second copy of it.
DISPATCH_ARG = Arg(
    MoEConfig.__dataclass_fields__["dispatch"].default.value, tuple(d.value for d in Dispatch)
)


def _convert(key: str, raw: str, spec: Arg) -> Any:
  if spec.choices is not None:
    if raw not in spec.choices:
      raise ValueError(
          f"config argument {key}={raw!r} is not allowed; {key} must be one of "
          f"{', '.join(spec.choices)}"
      )
    return raw
  what = {int: "an integer", float: "a number"}.get(spec.kind, "a string")
  bound = "" if spec.minimum is None else f" >= {spec.minimum}"
  try:
    value = spec.kind(raw)
  except ValueError:
    raise ValueError(f"config argument {key}={raw!r}: {key} must be {what}{bound}") from None
  if spec.minimum is not None and value < spec.minimum:
    raise ValueError(f"config argument {key}={raw!r}: {key} must be {what}{bound}")
  return value


def parse_arg(arg: str | None, spec: dict[str, Arg]) -> dict[str, Any]:
  """Parses "key=value,key=value" (big_vision style) into a dict with every key of `spec`.

  Args:
    arg: the string after the ':' of `--config=configs/x.py:arg`; None or '' gives the defaults.
    spec: the allowed keys and how to read their values.

  Raises:
    ValueError naming the key and the allowed keys or values, for an unknown key, a repeated key, a
    missing '=' or a bad value.
  """
  values = {key: s.default for key, s in spec.items()}
  seen = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep:
      raise ValueError(
          f"config argument {item!r} is not key=value; allowed keys: {', '.join(spec)}"
      )
    if key not in spec:
      raise ValueError(f"unknown config argument key {key!r}; allowed keys: {', '.join(spec)}")
    if key in seen:
      raise ValueError(f"config argument key {key!r} is given twice")
    seen.add(key)
    values[key] = _convert(key, raw, spec[key])
  return values
