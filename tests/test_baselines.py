"""Matched dense baselines (`moe.baselines`): by hand for tiny, within one rounding step everywhere."""

from __future__ import annotations

import importlib

import pytest

import configs.dense
from moe import accounting, baselines
from moe.config_dict import model_from_config_dict


def load(name: str):
  return importlib.import_module(f"configs.{name}")


def _without(cd, *keys):
  d = cd.to_dict()
  for key in keys:
    d["model"].pop(key)
  d.pop("name")
  d["mesh"].pop("rules")  # Dense baselines use the data-parallel rules: they have no experts.
  return d


def test_matched_dense_tiny_by_hand():
  # tiny: 4 layers, d=128, f=512; switch-8 makes layers 1 and 3 sparse. Per token, per layer, a GELU FFN
  # of width f costs 2 * 2 * d * f forward FLOPs: 512 per hidden unit. Sparse layer, S = 128 tokens:
  # C = ceil(1.25 * 128 / 8) = 20, so 8 * 20 / 128 = 1.25 expert evaluations per token, plus a router
  # of 2 * d * E = 2048 FLOPs = 4 hidden units' worth. Attention, logits and embeddings are shared.
  f_exact = (2 * 512 + 2 * (1.25 * 512 + 4)) / 4  # 578: rounds to 576, the nearest multiple of 8.
  sparse = load("switch").get_config("size=tiny")
  dense = load("dense").get_config("size=tiny,match=switch8")
  assert f_exact == 578 and dense.model.mlp_hidden == 576
  assert dense.model.moe is None
  assert _without(dense, "mlp_hidden", "moe") == _without(sparse, "mlp_hidden", "moe")
  # Total parameters: 4 * 2 * d * f_d = 2 * (2 * d * 512) + 2 * (8 * 2 * d * 512 + d * 8).
  f_params = (2 * 512 + 2 * 8 * 512 + 2 * 8 / 2) / 4  # 2306 -> 2304.
  assert load("dense").get_config("size=tiny,match_params=switch8").model.mlp_hidden == 2304
  assert f_params == 2306
  # Active parameters (the Switch paper's baseline): one expert of width 512 plus a router of d * 8
  # weights = 8 / 2 hidden units per sparse layer: 512 + 2 * 4 / 4 = 514 -> 512, the expert width.
  assert load("dense").get_config("size=tiny,match_active_params=switch8").model.mlp_hidden == 512


@pytest.mark.parametrize("size", ("smoke", "tiny", "small", "base"))
@pytest.mark.parametrize("sparse_name", ("switch8", "switch32", "top2", "expert_choice"))
@pytest.mark.parametrize("match", baselines.MATCHES)
def test_matched_dense_within_tolerance(size, sparse_name, match):
  # Tolerance: mlp_hidden is a multiple of 8, so every layer may be off by up to 4 hidden units; the
  # gap is at most 4 units of every layer's cost, and the neighbouring multiples are no closer.
  sparse = configs.dense.named_sparse(sparse_name, size, "shakespeare")
  dense = baselines.matched_dense(sparse, match)
  measure = {
      "active_flops": lambda c: accounting.flops_per_token(c, sparse.train.seq_len).total,
      "total_params": lambda c: accounting.param_counts(c).total,
      "active_params": lambda c: accounting.param_counts(c).active,
  }[match]
  target = measure(model_from_config_dict(sparse.model))
  cfg = model_from_config_dict(dense.model)
  assert cfg.moe is None and cfg.mlp_hidden % 8 == 0
  unit = measure(cfg.__class__(**{**cfg.__dict__, "mlp_hidden": cfg.mlp_hidden + 1})) - measure(cfg)
  gap = abs(measure(cfg) - target)
  assert gap <= 4 * unit + 1e-6
  for neighbour in (cfg.mlp_hidden - 8, cfg.mlp_hidden + 8):
    other = cfg.__class__(**{**cfg.__dict__, "mlp_hidden": neighbour})
    assert abs(measure(other) - target) >= gap


def test_matched_dense_needs_a_sparse_config():
  with pytest.raises(ValueError, match="sparse"):
    baselines.matched_dense(load("dense").get_config())
  with pytest.raises(ValueError, match="match"):
    baselines.matched_dense(load("switch").get_config(), "flops")
