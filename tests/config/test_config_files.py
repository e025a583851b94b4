"""The `configs` package: every config file builds a valid experiment; arguments and overrides behave."""

from __future__ import annotations

import importlib
import pathlib

import pytest

from configs import arguments
from configs.sizes import SIZES
from moe.config.config_dict import experiment_from_config_dict, model_from_config_dict
from moe.config.layer import MoEConfig
from moe.models import accounting

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILES = ("dense", "switch", "top2", "expert_choice", "ablations")


def load(name: str):
  """The module configs/<name>.py."""
  return importlib.import_module(f"configs.{name}")


def default_arg(name: str) -> str:
  return "family=experts" if name == "ablations" else ""


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("size", tuple(SIZES))
def test_every_file_and_size_is_accepted(name, size):
  arg = ",".join(a for a in (default_arg(name), f"size={size}") if a)
  cd = load(name).get_config(arg)
  assert set(cd.keys()) == {"name", "model", "train", "data", "mesh"}
  exp = experiment_from_config_dict(cd)
  assert exp.train.seq_len == SIZES[size].seq_len <= exp.model.max_len
  assert (exp.model.moe is None) == (name == "dense")
  from moe import data

  assert exp.model.vocab_size == data.vocab_size(exp.data) == 256 + 2  # Bytes, EOS, PAD.


def test_default_args_and_data():
  assert load("switch").get_config().name == "switch8_tiny"
  assert (
      load("switch").get_config(None).to_dict() == load("switch").get_config("size=tiny").to_dict()
  )
  exp = experiment_from_config_dict(load("dense").get_config("data=python_stdlib"))
  assert exp.data.source.value == "python_stdlib"
  # TFDS corpora use a 32k SentencePiece vocabulary; the model table is that size.
  cd = load("top2").get_config("data=c4,size=base")
  exp = experiment_from_config_dict(cd)
  assert exp.model.vocab_size == exp.data.sp_vocab_size == 32768
  assert exp.data.tfds_name == "c4/en"


def test_switch_and_top2_are_the_papers_recipes():
  # Switch Transformer (Fedus et al. 2021): top-1; capacity factor 1.25 in training and 2.0 at
  # evaluation (Sec. 2.2, Table 1); balance-loss weight 1e-2 (Sec. 2.2); sparse every other layer
  # (Sec. 2.1, Table 9); experts as wide as the dense FFN they replace. ST-MoE (Zoph et al. 2022,
  # Sec. 3): router z-loss weight 1e-3.
  exp = experiment_from_config_dict(load("switch").get_config("size=base"))
  moe = exp.model.moe
  assert (moe.top_k, moe.train_capacity_factor, moe.eval_capacity_factor) == (1, 1.25, 2.0)
  assert (moe.balance_loss_weight, moe.z_loss_weight) == (1e-2, 1e-3)
  assert exp.model.sparse_mask == (False, True) * 6
  assert moe.expert_hidden == exp.model.mlp_hidden
  # GShard (Lepikhin et al. 2020): two experts per token.
  top2 = experiment_from_config_dict(load("top2").get_config("dispatch=einsum")).model.moe
  assert (top2.top_k, top2.dispatch.value) == (2, "einsum")
  # Dropless computes every assignment: no capacity factor at all.
  dropless = experiment_from_config_dict(load("switch").get_config("dispatch=dropless")).model.moe
  assert dropless.dispatch.value == "dropless"
  assert dropless.train_capacity_factor is None and dropless.eval_capacity_factor is None


def test_size_table_is_about_switch_base_and_large():
  # Switch-Base / -Large shapes (Fedus et al. 2021 Table 9), decoder-only, with a 32k vocabulary.
  base = model_from_config_dict(load("dense").get_config("size=base,data=c4").model)
  assert (base.num_layers, base.d_model, base.num_heads, base.mlp_hidden) == (12, 768, 12, 3072)
  layer = 4 * 768 * 768 + 2 * 768 * 3072 + 2 * 768
  assert accounting.param_counts(base).total == 12 * layer + 32768 * 768 + 768
  large = model_from_config_dict(load("dense").get_config("size=large,data=c4").model)
  assert (large.num_layers, large.d_model, large.num_heads, large.mlp_hidden) == (
      24,
      1024,
      16,
      4096,
  )
  assert 300e6 < accounting.param_counts(large).total < 400e6


def test_absl_overrides():
  from absl import flags
  from ml_collections import config_flags

  argv = [
      "prog",
      f"--config={ROOT / 'configs' / 'switch.py'}:size=smoke",
      "--config.model.moe.num_experts=16",
      "--config.model.moe.dispatch=einsum",
      "--config.model.moe.train_capacity_factor=1.5",
      "--config.model.moe.group_size=32",
      "--config.model.num_kv_heads=1",
      "--config.model.sparse_layers=(0,1)",
      "--config.train.peak_flops_per_device=1e15",
      "--config.train.steps=7",
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


@pytest.mark.parametrize(
    "name,arg,key",
    [
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
    ],
)
def test_bad_args_name_the_key(name, arg, key):
  with pytest.raises(ValueError, match=key):
    load(name).get_config(arg)


def test_parse_arg():
  spec = {"size": arguments.SIZE_ARG, "experts": arguments.Arg(8, kind=int, minimum=1)}
  assert arguments.parse_arg(None, spec) == {"size": "tiny", "experts": 8}
  assert arguments.parse_arg(" size=smoke , experts=4 ,", spec) == {"size": "smoke", "experts": 4}
  with pytest.raises(ValueError, match="size.*twice"):
    arguments.parse_arg("size=smoke,size=tiny", spec)
  with pytest.raises(ValueError, match="key=value"):
    arguments.parse_arg("smoke", spec)
  with pytest.raises(ValueError, match="smoke, tiny, small, base, large"):
    arguments.parse_arg("size=medium", spec)
  with pytest.raises(ValueError, match="match_params"):
    load("dense").get_config("match=switch8,match_params=switch8")


def test_expert_choice_acknowledges_noncausal_routing():
  cd = load("expert_choice").get_config("size=smoke")
  exp = experiment_from_config_dict(cd)
  assert exp.model.moe.router.value == "experts_choose"
  assert exp.model.moe.allow_noncausal_routing is True
  cd.model.moe.allow_noncausal_routing = False
  with pytest.raises(ValueError, match="allow_noncausal_routing"):
    experiment_from_config_dict(cd)


# family -> the MoE field its member sets, and how to read the member.
_KNOBS = {
    "experts": ("num_experts", int),
    "capacity": ("train_capacity_factor", float),
    "dispatch": ("dispatch", str),
    "priority": ("priority", str),
    "zloss": ("z_loss_weight", float),
    "balance": ("balance_loss_weight", float),
    "topk": ("top_k", int),
    "jitter": ("jitter_eps", float),
    "router": ("router", str),
}


def _changed_moe_fields(base, cd) -> set[str]:
  """The model.moe fields whose value in config dict `cd` differs from `base`'s."""
  return {k for k, v in cd.model.moe.to_dict().items() if base.model.moe[k] != v}


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
      changed = _changed_moe_fields(base, cd)
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
      # Non-causal members (top-k > 1, batch-prioritised order) carry the acknowledgement.
      causal = MoEConfig(**dict(cd.model.moe, allow_noncausal_routing=False)).routing_is_causal
      assert exp.model.moe.allow_noncausal_routing == (not causal), (family, member)
      if family != "router":
        assert changed <= {field, "allow_noncausal_routing"}, (family, member, changed)
    assert len(names) == len(ablations.members(family))  # Distinct run names for a sweep.
  exp = experiment_from_config_dict(ablations.get_config("family=router,member=experts_choose"))
  assert exp.model.moe.top_k == 2 and exp.model.moe.allow_noncausal_routing
  with pytest.raises(ValueError, match="family"):
    ablations.members("colour")


def test_ablation_group_routes_in_groups_and_names_the_runs():
  ablations = load("ablations")
  plain = ablations.get_config("family=experts,member=32")
  grouped = ablations.get_config("family=experts,member=32,group=4096")
  exp = experiment_from_config_dict(grouped)
  assert exp.model.moe.group_size == 4096 and exp.model.moe.num_experts == 32
  changed = _changed_moe_fields(plain, grouped)
  assert changed == {"group_size"} and grouped.name != plain.name
  assert all("group=4096" in a for a in ablations.sweep("family=capacity,group=4096"))
  with pytest.raises(ValueError, match="group"):
    ablations.get_config("family=experts,group=0")


def test_ablation_capacity_applies_to_every_member_of_another_family():
  ablations = load("ablations")
  plain = ablations.get_config("family=experts,member=32")
  dropless = ablations.get_config("family=experts,member=32,capacity=dropless")
  exp = experiment_from_config_dict(dropless)
  assert exp.model.moe.dispatch.value == "dropless" and exp.model.moe.num_experts == 32
  assert exp.model.moe.train_capacity_factor is None and exp.model.moe.eval_capacity_factor is None
  changed = _changed_moe_fields(plain, dropless)
  assert changed == {"dispatch", "train_capacity_factor", "eval_capacity_factor"}
  assert dropless.name != plain.name
  two = ablations.get_config("family=topk,member=2,capacity=2.0")
  assert two.model.moe.train_capacity_factor == 2.0 and two.model.moe.top_k == 2
  with pytest.raises(ValueError, match="capacity must be one of"):
    ablations.get_config("family=experts,capacity=3")
  with pytest.raises(ValueError, match="capacity is for the other families"):
    ablations.get_config("family=capacity,capacity=1.0")


@pytest.mark.parametrize("regime", tuple(load("regimes").REGIMES))
def test_every_regime_builds_what_it_says(regime):
  regimes = load("regimes")
  r = regimes.REGIMES[regime]
  exp = experiment_from_config_dict(regimes.get_config(f"regime={regime}"))
  moe = exp.model.moe
  assert (moe.num_experts, moe.top_k, exp.model.sparse_every) == (
      r.experts,
      r.top_k,
      r.sparse_every,
  )
  assert exp.train.steps == r.steps and exp.data.source.value == r.data
  assert moe.group_size == r.group_size and moe.shared_expert_hidden == r.shared_hidden
  assert moe.expert_hidden == (r.expert_hidden or exp.model.mlp_hidden)
  if r.d_model:
    assert (exp.model.d_model, exp.model.head_dim, exp.model.mlp_hidden) == (
        r.d_model,
        32,
        4 * r.d_model,
    )
  assert exp.name == f"{regime}_tiny"
  assert regimes.MAIN in regimes.REGIMES and regimes.RECIPE_BASE in regimes.REGIMES
  assert regimes.sweep("size=tiny") == [f"regime={name},size=tiny" for name in regimes.REGIMES]


# Recipe family -> the model.moe fields its members may change from the family's base, by member
# (the first: none). The base is RECIPE_BASE's config but for `score`, which stands on granularity G = 2.
_RECIPE_BASE = {"score": "family=granularity,member=2"}
_RECIPE_CHANGES = {
    "recipe_balance": {"bias": {"balance"}, "none": {"balance"}},
    "score": {
        "sigmoid": {"score"},
        "sigmoid_bias": {"score", "balance", "sequence_balance_weight"},
    },
    "balance_scope": {"group512": {"group_size"}, "global512": {"group_size", "balance_scope"}},
    "granularity": {
        g: {"num_experts", "expert_hidden", "top_k", "serving_order"} for g in ("2", "4", "8")
    },
    "shared": {"shared128": {"num_experts", "expert_hidden", "shared_expert_hidden"}},
}


def _without_name(cd) -> dict:
  values = cd.to_dict()
  values.pop("name")
  return values


@pytest.mark.parametrize("family", tuple(_RECIPE_CHANGES))
def test_recipe_families_start_from_their_base(family):
  """Each recipe family's first member is its base (RECIPE_BASE's config, all but the name);
  the others change only their documented fields and build valid experiments with distinct names."""
  ablations, regimes = load("ablations"), load("regimes")
  base = regimes.get_config(f"regime={regimes.RECIPE_BASE}")
  if family in _RECIPE_BASE:
    base = ablations.get_config(_RECIPE_BASE[family])
  members = ablations.members(family)
  assert set(ablations.RECIPE_FAMILIES) == set(_RECIPE_CHANGES)
  first = ablations.get_config(f"family={family},member={members[0]}")
  assert _without_name(first) == _without_name(base)
  names = {first.name}
  for member in members[1:]:
    cd = ablations.get_config(f"family={family},member={member}")
    experiment_from_config_dict(cd)
    assert _changed_moe_fields(base, cd) == _RECIPE_CHANGES[family][member], member
    assert cd.train.to_dict() == base.train.to_dict() and cd.data.to_dict() == base.data.to_dict()
    names.add(cd.name)
  assert len(names) == len(members)


def test_recipe_members_hold_what_they_say():
  ablations = load("ablations")
  moe = lambda family, member: experiment_from_config_dict(
      ablations.get_config(f"family={family},member={member}")
  ).model.moe
  assert moe("recipe_balance", "bias").balance.value == "bias"
  deepseek = moe("score", "sigmoid_bias")
  assert (deepseek.score.value, deepseek.balance.value) == ("sigmoid", "bias")
  assert (deepseek.num_experts, deepseek.top_k) == (32, 2)  # Granularity G = 2.
  assert deepseek.sequence_balance_weight == 1e-4  # DeepSeek-V3's alpha.
  scoped = moe("balance_scope", "global512")
  assert scoped.balance_scope.value == "global" and 4096 // scoped.group_size == 8
  assert moe("balance_scope", "group512").balance_scope.value == "group"
  for g in ("2", "4", "8"):
    fine = moe("granularity", g)
    assert (fine.num_experts, fine.top_k, fine.expert_hidden) == (
        16 * int(g),
        int(g),
        256 // int(g),
    )
    assert fine.routing_is_causal and not fine.allow_noncausal_routing


def _expert_flops(cd) -> float:
  """Expert FFN model FLOPs per token, routed plus shared (`moe.models.accounting`)."""
  exp = experiment_from_config_dict(cd)
  counts = accounting.model_flops_per_token(exp.model, exp.train.seq_len)
  return counts.experts + counts.shared_expert


@pytest.mark.parametrize("size", ["smoke", "tiny"])
def test_granularity_and_shared_keep_active_flops_equal(size):
  """Split experts (E = 16 G of width f / G, top-G) and the shared layout do the expert FLOPs per
  token of the baseline and hold the same routed expert parameters (the shared layout adds its
  shared expert); only the router grows with E."""
  ablations = load("ablations")
  get = lambda family, member: ablations.get_config(f"family={family},member={member},size={size}")
  base = get("granularity", "1")
  params = lambda cd: accounting.param_counts(experiment_from_config_dict(cd).model)
  for family, member in [("granularity", g) for g in ("2", "4", "8", "16")] + [
      ("shared", "shared128")
  ]:
    cd = get(family, member)
    assert _expert_flops(cd) == _expert_flops(base), (family, member)
    assert _expert_flops(cd) > 0
    assert params(cd).experts == params(base).experts, (family, member)  # Routed: E * f kept.


def test_recipe_family_refusals_name_the_field():
  ablations = load("ablations")
  with pytest.raises(ValueError, match=r"granularity G=3 must divide moe.expert_hidden=256") as e:
    ablations.get_config("family=granularity,member=3")
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="member must be one of loss, bias, none"):
    ablations.get_config("family=recipe_balance,member=aux")
  for arg in ("data=shakespeare", "group=512", "capacity=1.0"):
    key = arg.split("=")[0]
    with pytest.raises(ValueError, match=f"config argument {key} is not for family score"):
      ablations.get_config(f"family=score,{arg}")
