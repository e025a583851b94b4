"""research.verdict, the main job's verdict: which figures come from this run and which from the committed
results, and when the gap counts as resolved (beyond 3 standard errors)."""

from __future__ import annotations

import json
import math

import pytest

from research import verdict


def summary(name: str, seeds, gap=None, se=None, std=None) -> dict:
  out = {"name": name, "seeds": list(seeds), "final_std": std}
  if gap is not None:
    out["gaps"] = {"active_flops": {"gap": gap, "se": se}}
  return out


@pytest.fixture
def committed(tmp_path):
  path = tmp_path / "report.json"
  configs = [
      summary("sparse", (0, 1, 2), gap=-0.03, se=0.006, std=0.006),
      summary("dense", (0, 1, 2), std=0.008),
  ]
  path.write_text(json.dumps({"configs": configs}))
  return path


def test_one_seed_uses_the_committed_spread_and_says_so(committed):
  # One seed each: se = hypot(0.006, 0.008) = 0.010; a gap of -0.035 is -3.5 se: resolved.
  text = verdict.verdict(summary("sparse", [0], -0.035, math.nan), summary("dense", [0]), committed)
  assert "Measured in this run: gap (sparse - dense) = -0.0350" in text
  assert f"Committed in {committed}: gap -0.0300 ± 0.0060 (-5.0σ, 3 vs 3" in text
  assert "-3.5 standard errors (0.0100, from the committed seed spread)" in text
  assert "Resolved: the sparse model reaches a lower validation loss" in text


def test_a_gap_within_three_standard_errors_rests_on_the_committed_seeds(committed, tmp_path):
  # se 0.010 from the committed spread; the committed gap -0.030 +- 0.006 is -5.0 sigma.
  text = verdict.verdict(summary("sparse", [0], -0.025, math.nan), summary("dense", [0]), committed)
  assert "-2.5 standard errors" in text
  assert "Resolved by the committed seeds: over 3 seeds the sparse model ends lower" in text
  assert "by 0.030 nats per token (-5.0σ); this run alone is within noise of that (0.5 of" in text
  far = verdict.verdict(summary("sparse", [0], +0.001, math.nan), summary("dense", [0]), committed)
  assert (
      "Not resolved" in far and "3.1 of its standard errors away" in far and "Resolved" not in far
  )
  weak = tmp_path / "weak.json"  # A committed gap of -2.0 sigma resolves nothing.
  weak.write_text(
      json.dumps(
          {
              "configs": [
                  summary("sparse", (0, 1, 2), gap=-0.012, se=0.006, std=0.006),
                  summary("dense", (0, 1, 2), std=0.008),
              ]
          }
      )
  )
  text = verdict.verdict(summary("sparse", [0], -0.025, math.nan), summary("dense", [0]), weak)
  assert "Not resolved: the gap is within 3 standard errors" in text


def test_several_seeds_use_their_own_error(committed):
  text = verdict.verdict(
      summary("sparse", [0, 1, 2], +0.05, 0.01), summary("dense", [0, 1, 2]), committed
  )
  assert "+5.0 standard errors (0.0100, from this run's seeds)" in text
  assert "Resolved: the sparse model is worse" in text


def test_without_committed_results_it_asks_for_seeds(tmp_path):
  absent = tmp_path / "absent.json"
  text = verdict.verdict(summary("sparse", [0], -0.035, math.nan), summary("dense", [0]), absent)
  assert "No committed seed spread" in text and "Resolved" not in text
