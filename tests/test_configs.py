"""Every config file builds a valid experiment; arguments, overrides and matched baselines behave."""

from __future__ import annotations

import pathlib

import pytest

from moe import accounting, presets
from moe.config import experiment_from_config_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = ("dense", "switch", "top2", "expert_choice", "ablations")

load = presets.config_module


def default_arg(name: str) -> str:
  return "family=experts" if name == "ablations" else ""


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("size", tuple(presets.SIZES))
def test_every_file_and_size_is_accepted(name, size):
  arg = ",".join(a for a in (default_arg(name), f"size={size}") if a)
  cd = load(name).get_config(arg)
  assert set(cd.keys()) == {"name", "model", "train", "data", "mesh"}
  exp = experiment_from_config_dict(cd)
  assert exp.train.seq_len == presets.SIZES[size].seq_len <= exp.model.max_len
  assert (exp.model.moe is None) == (name == "dense")
  from moe import data
  assert exp.model.vocab_size == data.vocab_size(exp.data) == 256 + 2  # Bytes, EOS, PAD.


def test_default_args_and_data():
  assert load("switch").get_config().name == "switch8_tiny"
  assert load("switch").get_config(None).to_dict() == load("switch").get_config("size=tiny").to_dict()
  exp = experiment_from_config_dict(load("dense").get_config("data=python_stdlib"))
  assert exp.data.source.value == "python_stdlib"
  # TFDS corpora use a 32k SentencePiece vocabulary; the model table is that size.
  cd = load("top2").get_config("data=c4,size=base")
  exp = experiment_from_config_dict(cd)
  assert exp.model.vocab_size == exp.data.sp_vocab_size == 32768
  assert exp.data.tfds_name == "c4/en"


def test_sparse_defaults():
  exp = experiment_from_config_dict(load("switch").get_config("size=base"))
  moe = exp.model.moe
  assert (moe.num_experts, moe.top_k, moe.dispatch.value) == (8, 1, "gather")
  assert (moe.train_capacity_factor, moe.eval_capacity_factor) == (1.25, 2.0)
  assert (moe.balance_loss_weight, moe.z_loss_weight) == (1e-2, 1e-3)
  assert exp.model.sparse_mask == (False, True) * 6  # Every other layer (Switch Transformer).
  assert moe.expert_hidden == exp.model.mlp_hidden == 3072
  tiny = experiment_from_config_dict(load("switch").get_config("size=tiny")).model
  assert tiny.num_sparse_layers >= 2
  top2 = experiment_from_config_dict(load("top2").get_config("dispatch=einsum")).model.moe
  assert (top2.top_k, top2.dispatch.value) == (2, "einsum")
  dropless = experiment_from_config_dict(load("switch").get_config("dispatch=dropless")).model.moe
  assert dropless.dispatch.value == "dropless" and dropless.train_capacity_factor is None


def test_size_table_is_about_switch_base_and_large():
  # Switch-Base / -Large shapes (Fedus et al. 2021 Table 9), decoder-only, with a 32k vocabulary.
  base = presets.model_config(load("dense").get_config("size=base,data=c4"))
  assert (base.num_layers, base.d_model, base.num_heads, base.mlp_hidden) == (12, 768, 12, 3072)
  layer = 4 * 768 * 768 + 2 * 768 * 3072 + 2 * 768
  assert accounting.param_counts(base).total == 12 * layer + 32768 * 768 + 768
  large = presets.model_config(load("dense").get_config("size=large,data=c4"))
  assert (large.num_layers, large.d_model, large.num_heads, large.mlp_hidden) == (24, 1024, 16, 4096)
  assert 300e6 < accounting.param_counts(large).total < 400e6


def test_absl_overrides():
  from absl import flags
  from ml_collections import config_flags
  argv = [
      "prog", f"--config={ROOT / 'configs' / 'switch.py'}:size=smoke",
      "--config.model.moe.num_experts=16", "--config.model.moe.dispatch=einsum",
      "--config.model.moe.train_capacity_factor=1.5", "--config.model.moe.group_size=32",
      "--config.model.num_kv_heads=1", "--config.model.sparse_layers=(0,1)",
      "--config.train.peak_flops_per_device=1e15", "--config.train.steps=7",
      "--config.data.cache_dir=/tmp/moe_cache",
  ]
  fv = flags.FlagValues()
  # sys_argv: the override flags exist once the config file named in argv has been loaded.
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  exp = experiment_from_config_dict(fv.config)
  assert exp.model.moe.num_experts == 16 and exp.model.moe.dispatch.value == "einsum"
  assert exp.model.moe.train_capacity_factor == 1.5 and exp.model.moe.group_size == 32
  assert exp.model.num_kv_heads == 1 and exp.model.sparse_mask == (True, True)
  assert exp.train.peak_flops_per_device == 1e15 and exp.train.steps == 7
  assert exp.data.cache_dir == "/tmp/moe_cache"


@pytest.mark.parametrize("name,arg,key", [
    ("switch", "size=huge", "size"),
    ("switch", "experts=eight", "experts"),
    ("switch", "experts=0", "experts"),
    ("switch", "colour=blue", "colour"),
    ("switch", "dispatch=scatter", "dispatch"),
    ("top2", "data=wikipedia", "data"),
    ("dense", "match=switch7", "match"),
    ("expert_choice", "dispatch=dropless", "dispatch"),
    ("ablations", "family=colour", "family"),
    ("ablations", "family=experts,member=7", "member"),
    ("ablations", "", "family"),
])
def test_bad_args_name_the_key(name, arg, key):
  with pytest.raises(ValueError, match=key):
    load(name).get_config(arg)


def test_parse_arg():
  spec = {"size": presets.SIZE_ARG, "experts": presets.Arg(8, kind=int, minimum=1)}
  assert presets.parse_arg(None, spec) == {"size": "tiny", "experts": 8}
  assert presets.parse_arg(" size=smoke , experts=4 ,", spec) == {"size": "smoke", "experts": 4}
  with pytest.raises(ValueError, match="size.*twice"):
    presets.parse_arg("size=smoke,size=tiny", spec)
  with pytest.raises(ValueError, match="key=value"):
    presets.parse_arg("smoke", spec)
  with pytest.raises(ValueError, match="smoke, tiny, small, base, large"):
    presets.parse_arg("size=medium", spec)
  with pytest.raises(ValueError, match="match_params"):
    load("dense").get_config("match=switch8,match_params=switch8")


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
@pytest.mark.parametrize("match", presets.MATCHES)
def test_matched_dense_within_tolerance(size, sparse_name, match):
  # Tolerance: mlp_hidden is a multiple of 8, so every layer may be off by up to 4 hidden units; the
  # gap is at most 4 units of every layer's cost, and the neighbouring multiples are no closer.
  sparse = presets.named_sparse(sparse_name, size)
  dense = presets.matched_dense(sparse, match)
  measure = {
      "active_flops": lambda c: accounting.flops_per_token(c, sparse.train.seq_len).total,
      "total_params": lambda c: accounting.param_counts(c).total,
      "active_params": lambda c: accounting.param_counts(c).active,
  }[match]
  target = measure(presets.model_config(sparse))
  cfg = presets.model_config(dense)
  assert cfg.moe is None and cfg.mlp_hidden % 8 == 0
  unit = measure(cfg.__class__(**{**cfg.__dict__, "mlp_hidden": cfg.mlp_hidden + 1})) - measure(cfg)
  gap = abs(measure(cfg) - target)
  assert gap <= 4 * unit + 1e-6
  for neighbour in (cfg.mlp_hidden - 8, cfg.mlp_hidden + 8):
    other = cfg.__class__(**{**cfg.__dict__, "mlp_hidden": neighbour})
    assert abs(measure(other) - target) >= gap


def test_matched_dense_needs_a_sparse_config():
  with pytest.raises(ValueError, match="sparse"):
    presets.matched_dense(load("dense").get_config())
  with pytest.raises(ValueError, match="match"):
    presets.matched_dense(load("switch").get_config(), "flops")


def test_expert_choice_acknowledges_noncausal_routing():
  cd = load("expert_choice").get_config("size=smoke")
  exp = experiment_from_config_dict(cd)
  assert exp.model.moe.router.value == "experts_choose"
  assert exp.model.moe.allow_noncausal_routing is True
  cd.model.moe.allow_noncausal_routing = False
  with pytest.raises(ValueError, match="allow_noncausal_routing"):
    experiment_from_config_dict(cd)


# family -> the MoE field its member sets, and how to read the member.
_KNOBS = {"experts": ("num_experts", int), "capacity": ("train_capacity_factor", float),
          "dispatch": ("dispatch", str), "priority": ("priority", str),
          "zloss": ("z_loss_weight", float), "balance": ("balance_loss_weight", float),
          "topk": ("top_k", int), "jitter": ("jitter_eps", float), "router": ("router", str)}


def test_ablation_members_change_one_knob():
  ablations = load("ablations")
  base = load("switch").get_config("size=tiny")
  assert set(ablations.FAMILIES) == set(_KNOBS) | {"every"}
  for family in ablations.FAMILIES:
    names = set()
    for member in ablations.members(family):
      cd = ablations.get_config(f"family={family},member={member}")
      exp = experiment_from_config_dict(cd)
      names.add(cd.name)
      changed = {k for k, v in cd.model.moe.to_dict().items() if base.model.moe[k] != v}
      if family == "every":
        assert exp.model.sparse_every == int(member) and not changed
        continue
      field, read = _KNOBS[family]
      if member == "dropless":  # No capacity: the dispatch must compute every assignment.
        assert exp.model.moe.dispatch.value == "dropless"
        assert changed == {"dispatch", "train_capacity_factor", "eval_capacity_factor"}
        continue
      value = getattr(exp.model.moe, field)
      assert getattr(value, "value", value) == read(member), (family, member)
      if family != "router":
        assert changed <= {field}, (family, member, changed)
    assert len(names) == len(ablations.members(family))  # Distinct run names for a sweep.
  exp = experiment_from_config_dict(ablations.get_config("family=router,member=experts_choose"))
  assert exp.model.moe.top_k == 2 and exp.model.moe.allow_noncausal_routing
  with pytest.raises(ValueError, match="family"):
    ablations.members("colour")
