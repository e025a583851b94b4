"""The one conversion from a config value (an enum member or its string value) to an enum member.

Config files and command-line overrides give strings ("gather", "Expert_FSDP"); the dataclasses store
enum members. Every enum field of every config (`moe.config`, `moe.sharding`, `moe.data.config`) goes
through `as_enum`, so every bad value fails the same way: one line naming the field and the allowed
values.
"""

from __future__ import annotations

import enum
from typing import Any


def as_enum[E: enum.Enum](enum_cls: type[E], value: Any, field: str) -> E:
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
