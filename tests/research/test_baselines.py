"""Matched dense baselines (`research.baselines`): by hand for tiny, within one rounding step everywhere."""

from __future__ import annotations

import importlib
import math

import pytest

import configs.dense
from research import baselines


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
  # Measured by hand from the shapes (`_hand_measure`), not with the accounting the search uses.
  # Tolerance: mlp_hidden is a multiple of 8, so every layer may be off by up to 4 hidden units, and
  # the neighbouring multiples are no closer.
  sparse = configs.dense.named_sparse(sparse_name, size, "shakespeare")
  dense = baselines.matched_dense(sparse, match)
  seq_len = sparse.train.seq_len
  target = _hand_measure(match, sparse.model.to_dict(), seq_len)
  model = dense.model.to_dict()
  assert model["moe"] is None and model["mlp_hidden"] % 8 == 0
  measure = lambda f: _hand_measure(match, {**model, "mlp_hidden": f}, seq_len)
  gap = abs(measure(model["mlp_hidden"]) - target)
  assert gap <= 4 * measure(1) + 1e-6
  for neighbour in (model["mlp_hidden"] - 8, model["mlp_hidden"] + 8):
    assert abs(measure(neighbour) - target) >= gap


def _layout(name: str):
  """Sparse configs that no name table knows: the layouts a researcher changes."""
  cd = load("switch").get_config("size=tiny")
  moe = cd.model.moe
  if name == "top2":  # With a capacity, top-2 is not causal: acknowledged, as configs/top2.py does.
    moe.top_k, moe.allow_noncausal_routing = 2, True
  elif name == "every_layer":
    cd.model.sparse_every = 1
  elif (
      name == "fine_grained"
  ):  # 4x the experts, a quarter of the width, top-4: same active FFN width.
    moe.num_experts, moe.expert_hidden, moe.top_k = 32, 128, 4
    moe.allow_noncausal_routing = True
  elif name == "dropless_top2_every_layer":
    cd.model.sparse_every, moe.top_k, moe.dispatch = 1, 2, "dropless"
    moe.train_capacity_factor = moe.eval_capacity_factor = None
  elif name == "swiglu_experts":
    moe.activation, moe.expert_hidden = "swiglu", 384
  return cd


def _hand_measure(match: str, model: dict, seq_len: int) -> float:
  """Parameters and FLOPs per token counted here from the shapes, not with moe.models.accounting.

  A FFN of width f (GELU: two d x f matrices; SwiGLU: three) has m * d * f parameters and costs 6 FLOPs
  per parameter per token in training (2 forward, 4 backward). Everything outside the FFNs is shared by
  the sparse model and its dense baseline, so it cancels and is left out. A sparse layer (the last of
  each run of sparse_every layers): E experts of width f_e and a d x E router; per token, E * C / S
  expert evaluations with C = min(S, max(ceil(cf * k * S / E), min_capacity)) (capacity slack), or
  k (dropless), S the routing group (a sequence unless group_size says otherwise).
  """
  d, moe = model["d_model"], model["moe"]
  mats = lambda act: 3 if act == "swiglu" else 2
  total = active = flops = 0.0
  for layer in range(model["num_layers"]):
    if moe is None or layer % model["sparse_every"] != model["sparse_every"] - 1:
      p = mats(model["activation"]) * d * model["mlp_hidden"]
      total, active, flops = total + p, active + p, flops + 6 * p
      continue
    e, k, cf = moe["num_experts"], moe["top_k"], moe["train_capacity_factor"]
    expert = mats(moe["activation"]) * d * moe["expert_hidden"]
    total += e * expert + d * e
    active += k * expert + d * e
    s = moe["group_size"] or seq_len
    slots = min(s, max(math.ceil(cf * k * s / e), moe["min_capacity"])) if cf is not None else 0
    evaluations = k if cf is None else e * slots / s
    flops += 6 * (evaluations * expert + d * e)
  return {"active_flops": flops, "total_params": total, "active_params": active}[match]


@pytest.mark.parametrize(
    "layout", ("top2", "every_layer", "fine_grained", "dropless_top2_every_layer", "swiglu_experts")
)
@pytest.mark.parametrize("match", baselines.MATCHES)
def test_any_sparse_layout_is_matched_within_one_rounding_step(layout, match):
  sparse = _layout(layout)
  dense = baselines.matched_dense(sparse, on=match)
  assert dense.model.moe is None and dense.model.mlp_hidden % 8 == 0
  seq_len = sparse.train.seq_len
  target = _hand_measure(match, sparse.model.to_dict(), seq_len)
  got = _hand_measure(match, dense.model.to_dict(), seq_len)
  # One hidden unit of every layer: the rounding to multiples of 8 is off by at most 4 of them.
  unit = _hand_measure(match, {**dense.model.to_dict(), "mlp_hidden": 1}, seq_len)
  assert abs(got - target) <= 4 * unit, (got, target, unit)


def test_matched_dense_needs_a_sparse_config():
  with pytest.raises(ValueError, match="sparse"):
    baselines.matched_dense(load("dense").get_config())
  with pytest.raises(ValueError, match="on='flops' is not one of active_flops"):
    baselines.matched_dense(load("switch").get_config(), on="flops")
