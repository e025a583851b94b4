"""Timing and MFU scripts, each run as `python -m benchmarks.<name>` (docs/benchmarks.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing for `app.run(main, flags_parser=...)`, a refused flag said in one line.

  absl's own parser prints the error and a second line about --helpfull; a benchmark launched from a
  script should leave one line naming the flag and what it accepts in the log.
  """

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:
      sys.exit(f"{program}: {error}")

  return parse
