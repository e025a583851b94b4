"""Regenerates docs/RESULTS.md's tables and docs/results/<sweep>/ from the sweep roots: one command.

    python -m research.results                 # every sweep in SWEEPS whose root exists
    python -m research.results --only=experts  # one of them

For each sweep it runs `research.report` into docs/results/<key>/ (report.md, report.json: the
aggregated numbers, committed; the plots) and replaces the block between `<!-- report:<key> -->` and
`<!-- /report:<key> -->` in docs/RESULTS.md with the table. The readings around the blocks are written
by hand. The runs themselves (runs/sweeps/...) stay out of git; the commands that produce them are in
docs/RESULTS.md next to each table.
"""

from __future__ import annotations

import pathlib
import re
import sys

from absl import app, flags

from research import report as report_cli
from moe import atomic_file

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "RESULTS.md"
OUT = REPO / "docs" / "results"

# key -> (sweep root, config drawn in the expert-load heatmap or None for the first sparse one).
SWEEPS: dict[str, tuple[str, str | None]] = {
    "main": ("runs/sweeps/regimes", None),  # The main job's regime (configs/regimes.py MAIN).
    "scaling": ("runs/sweeps/scaling", None),  # Finding h: the dense frontier and EL.
    "gpu_small": ("runs/sweeps/gpu_small", None),  # Finding a at the small size, one H200.
    "experts": ("runs/sweeps/experts", "experts-32_group4096_tiny"),
    "capacity": ("runs/sweeps/capacity", None),
    "topk": ("runs/sweeps/topk", None),
    "balance": ("runs/sweeps/balance", "balance-0_tiny"),
    "serving_order": ("runs/sweeps/serving_order", None),
    "upcycle": ("runs/sweeps/upcycle", "upcycle_sparse_tiny"),
    "recipes": ("runs/sweeps/recipes", None),  # Issue 22: configs/ablations.py on RECIPE_BASE.
}

_ONLY = flags.DEFINE_list("only", None, "Regenerate only these sweeps (keys of SWEEPS).")


def replace_block(text: str, key: str, table: str) -> str:
  """`text` with the block of `key` replaced by `table` (the markers stay)."""
  pattern = re.compile(rf"(<!-- report:{key} -->\n).*?(<!-- /report:{key} -->)", re.S)
  if not pattern.search(text):
    raise ValueError(f"{DOC}: no <!-- report:{key} --> ... <!-- /report:{key} --> block")
  return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  keys = _ONLY.value or list(SWEEPS)
  unknown = [k for k in keys if k not in SWEEPS]
  if unknown:
    sys.exit(f"research.results: --only: {', '.join(unknown)} not in {', '.join(SWEEPS)}")
  text = DOC.read_text()
  for key in keys:
    root, heatmap = SWEEPS[key]
    if not (REPO / root).exists():
      print(f"{key}: {root} does not exist here; its table is left as it is")
      continue
    table = report_cli.write_report(REPO / root, OUT / key, heatmap)
    text = replace_block(text, key, table)
    print(f"{key}: {OUT / key}")
  atomic_file.atomic_write(DOC, text)


if __name__ == "__main__":
  app.run(main)
