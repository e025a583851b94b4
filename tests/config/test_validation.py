"""`moe.config.validation`: the one string -> enum conversion and the range check of every config."""

from __future__ import annotations

import enum

import pytest

from moe.config.validation import as_enum


class Colour(enum.Enum):
  RED = "red"
  DARK_BLUE = "dark_blue"


def test_members_and_their_values_in_any_case():
  assert as_enum(Colour, Colour.RED, "x") is Colour.RED
  assert as_enum(Colour, "red", "x") is Colour.RED
  assert as_enum(Colour, " Dark_Blue ", "x") is Colour.DARK_BLUE


@pytest.mark.parametrize("value", ["green", "RED ish", 1, None, "DARK BLUE"])
def test_anything_else_names_the_field_and_the_allowed_values(value):
  with pytest.raises(ValueError) as error:
    as_enum(Colour, value, "paint.colour")
  assert str(error.value) == f"paint.colour={value!r} is not one of 'red', 'dark_blue'"
