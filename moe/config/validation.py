"""Validation of config values, shared by every config dataclass: enums and numeric ranges.

Config files and command-line overrides give strings ("gather", "Expert_FSDP") and numbers; the
dataclasses (`moe.config`, `moe.config.train`, `moe.parallel.sharding`, `moe.config.data`) check them in
`__post_init__` through these two functions, so every bad value fails the same way, before anything is
traced: one line naming the field and the allowed values or range.
"""

from __future__ import annotations

import enum
import math
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.Enum)


def as_enum(enum_cls: type[E], value: Any, field: str) -> E:
  """`value` as a member of `enum_cls`: a member, or its value as a string in any case.

  Args:
    enum_cls: the enum class.
    value: a member of it or a member's value (case-insensitive, surrounding spaces ignored).
    field: the dotted config field, for the error message (e.g. "moe.dispatch").

  Raises:
    ValueError: "<field>=<value> is not one of <allowed values>".
  """
  if isinstance(value, enum_cls):
    return value
  if isinstance(value, str):
    for member in enum_cls:
      if member.value == value.strip().lower():
        return member
  allowed = ", ".join(repr(m.value) for m in enum_cls)
  raise ValueError(f"{field}={value!r} is not one of {allowed}")


def check_number(
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> None:
  """Raises one line naming `field` and its allowed range unless `value` is a finite number in it.

  NaN and infinities are always refused (`nan < 0` is False, so a plain comparison lets NaN through).
  """
  kind = "an integer" if integer else "a number"
  lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
  hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
  allowed = f"{kind} {lo}{' and ' if lo and hi else ''}{hi}".rstrip()
  ok = (
      (isinstance(value, int) if integer else isinstance(value, (int, float)))
      and not isinstance(value, bool)
      and math.isfinite(value)
  )
  ok = ok and (low is None or (value > low if low_open else value >= low))
  ok = ok and (high is None or (value < high if high_open else value <= high))
  if not ok:
    raise ValueError(f"{field}={value!r} must be {allowed}{hint}")
