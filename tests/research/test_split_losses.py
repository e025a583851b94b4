"""research/split_losses.py's table: per config, means over seeds, held-out minus unseen."""

from __future__ import annotations

from research import split_losses


def row(name, seed, validation, not_drawn, drawn):
  return dict(
      name=name,
      seed=seed,
      validation=validation,
      train=None,
      train_drawn=drawn,
      train_not_drawn=not_drawn,
  )


def test_a_line_per_config_with_the_means_over_its_seeds():
  rows = [
      row("sparse", 0, 1.10, 1.00, 0.98),
      row("dense", 0, 1.20, 1.15, 1.15),
      row("sparse", 1, 1.20, 1.04, None),  # No window of this evaluation was drawn.
  ]
  lines = split_losses.table(rows).splitlines()
  assert len(lines) == 4
  assert lines[2] == "| sparse | 2 | 1.1500 | 1.0200 | 0.9800 | +0.1300 |"
  assert lines[3] == "| dense | 1 | 1.2000 | 1.1500 | 1.1500 | +0.0500 |"
