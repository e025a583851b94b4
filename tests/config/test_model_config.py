"""`moe.config`: which routings are causal, and the decoder's one policy for the others."""

from __future__ import annotations

import pytest

import moe_reference as ref
from moe.config.layer import MoEConfig, capacity
from moe.config.model import ModelConfig

# (router, top_k, priority, dispatch, train cf, eval cf) -> causal. Written out from the argument in
# MoEConfig.routing_is_causal: only competition for a capacity can couple tokens, and only claims
# served in sequence order, one per token, keep that coupling pointing backwards.
CASES = [
    (("tokens_choose", 1, "index", "gather", 1.25, 2.0), True),
    (("tokens_choose", 1, "index", "einsum", 0.5, 0.5), True),
    (("tokens_choose", 1, "batch_prioritized", "gather", 1.25, 2.0), False),
    (("tokens_choose", 2, "index", "gather", 1.25, 2.0), False),
    (("tokens_choose", 2, "index", "einsum", 1.25, None), False),  # Eval capacity still binds.
    (("tokens_choose", 2, "index", "einsum", None, None), True),  # C = S: nothing competes.
    (("tokens_choose", 2, "batch_prioritized", "gather", None, None), True),
    (("tokens_choose", 2, "index", "dropless", None, None), True),
    (("tokens_choose", 4, "batch_prioritized", "dropless", None, None), True),
    (("experts_choose", 2, "index", "gather", 1.0, 1.0), False),
]


def moe(router, top_k, priority, dispatch, train_cf, eval_cf, **kw) -> MoEConfig:
  return MoEConfig(
      num_experts=4,
      expert_hidden=8,
      router=router,
      top_k=top_k,
      priority=priority,
      dispatch=dispatch,
      train_capacity_factor=train_cf,
      eval_capacity_factor=eval_cf,
      **kw,
  )


def decoder(moe_cfg: MoEConfig) -> ModelConfig:
  return ModelConfig(vocab_size=16, d_model=8, num_layers=2, num_heads=2, mlp_hidden=8, moe=moe_cfg)


@pytest.mark.parametrize("case,causal", CASES)
def test_routing_is_causal(case, causal):
  assert moe(*case).routing_is_causal is causal


@pytest.mark.parametrize("case,causal", CASES)
def test_decoder_refuses_noncausal_routing_unless_acknowledged(case, causal):
  if causal:
    decoder(moe(*case))
  else:
    with pytest.raises(
        ValueError, match=r"model.moe routing .* model.moe.allow_noncausal_routing=True"
    ):
      decoder(moe(*case))
  assert decoder(moe(*case, allow_noncausal_routing=True)).moe.allow_noncausal_routing


# A bad value for each field that has a range, as a hostile user would type it: (dotted field, value,
# the text the message must name). Each is refused while the config is built, before anything is
# traced or compiled.
BAD_VALUES = [
    (
        "model.moe.train_capacity_factor",
        -1.0,
        "moe.train_capacity_factor=-1.0 must be a number > 0, or None (dropless)",
    ),
    (
        "model.moe.eval_capacity_factor",
        0.0,
        "moe.eval_capacity_factor=0.0 must be a number > 0, or None (dropless)",
    ),
    ("model.moe.train_capacity_factor", float("nan"), "moe.train_capacity_factor"),
    ("model.moe.balance_loss_weight", float("nan"), "moe.balance_loss_weight"),
    ("model.moe.balance_loss_weight", -0.01, "moe.balance_loss_weight"),
    ("model.moe.z_loss_weight", float("inf"), "moe.z_loss_weight"),
    ("model.moe.jitter_eps", 1.0, "moe.jitter_eps"),
    ("model.moe.num_experts", 0, "moe.num_experts"),
    ("model.moe.top_k", 9, "moe.top_k"),
    ("model.moe.min_capacity", -1, "moe.min_capacity"),
    ("model.moe.group_size", 0, "moe.group_size"),
    ("model.moe.shared_expert_hidden", -8, "moe.shared_expert_hidden"),
    ("model.moe.dispatch", "scatter", "moe.dispatch"),
    ("model.moe.router", "random", "moe.router"),
    ("model.rope_theta", -1.0, "model.rope_theta"),
    ("model.norm_eps", -1.0, "model.norm_eps"),
    ("model.norm_eps", 0.0, "model.norm_eps"),
    ("model.num_kv_heads", 3, "model.num_kv_heads"),
    ("model.dtype", "float16", "model.dtype"),
    ("model.remat", "some", "model.remat"),
    ("train.seq_len", 65, "train.seq_len=65 must be <= model.max_len=64"),
    ("train.warmup_steps", 21, "train.warmup_steps=21 must be <= train.steps=20"),
    ("train.b1", 1.5, "train.b1"),
    ("train.b2", -1.0, "train.b2"),
    ("train.eps", -1.0, "train.eps"),
    ("train.learning_rate", float("nan"), "train.learning_rate"),
    ("train.weight_decay", -0.1, "train.weight_decay"),
    ("train.grad_clip_norm", float("nan"), "train.grad_clip_norm"),
    ("train.end_lr_fraction", 1.5, "train.end_lr_fraction"),
    ("train.schedule", "linear", "train.schedule"),
    ("train.peak_flops_per_device", -1.0, "train.peak_flops_per_device"),
    ("data.seed", -1, "data.seed"),
    ("data.source", "wikipedia", "data.source"),
    ("mesh.rules", "zero3", "mesh.rules"),
    ("mesh.expert", 0, "mesh.expert"),
]


@pytest.mark.parametrize(
    "field,value,named", BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES]
)
def test_bad_values_are_refused_naming_the_field(field, value, named):
  import configs.switch
  from moe.config.config_dict import experiment_from_config_dict

  cd = configs.switch.get_config("size=smoke")
  *sections, key = field.split(".")
  target = cd
  for section in sections:
    target = target[section]
  with target.ignore_type():  # The override as a command line would give it, type checks aside.
    target[key] = value
  with pytest.raises(ValueError) as error:
    experiment_from_config_dict(cd)
  message = str(error.value)
  assert named in message and "\n" not in message, message


def test_capacity_formula():
  cases = [
      ((64, 8, 1, 1.0, 4), 8),
      ((64, 8, 2, 1.25, 4), 20),  # ceil(1.25 * 2 * 64 / 8)
      ((10, 3, 1, 1.0, 0), 4),  # ceil(10 / 3)
      ((64, 8, 1, 0.01, 4), 4),
      ((16, 2, 2, 4.0, 4), 16),  # Clamped to S.
      ((16, 4, 2, None, 4), 16),
      ((5, 1, 1, 1.2, 0), 5),  # 1.2 * 5 = 6.000000000000001 in floats.
      ((10, 5, 1, 0.1, 0), 1),  # 0.1 * 10 / 5 = 0.2, not a float just above 1 slot's worth.
      ((30, 10, 1, 0.1, 0), 1),  # 0.1 * 3 = 0.30000000000000004 in floats.
  ]
  for args, expected in cases:
    assert capacity(*args) == expected, args
    assert ref.reference_capacity(*args) == expected, args
  # The implementation and the exact-rational reference agree on a grid.
  for s in (1, 5, 8, 16, 30, 64):
    for e in (1, 3, 4, 8):
      for k in (1, 2):
        for cf in (None, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 1.0, 1.1, 1.2, 1.25, 1.5, 2.0, 3.3):
          for min_capacity in (0, 4):
            if k <= e:
              assert capacity(s, e, k, cf, min_capacity) == ref.reference_capacity(
                  s, e, k, cf, min_capacity
              ), (s, e, k, cf, min_capacity)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_experts": 4, "top_k": 5}, "moe.top_k"),
        ({"num_experts": 4, "top_k": 0}, "moe.top_k"),
        ({"num_experts": 0}, "moe.num_experts"),
        ({"num_experts": 4, "min_capacity": -1}, "moe.min_capacity"),
        (
            {
                "num_experts": 4,
                "router": "experts_choose",
                "dispatch": "dropless",
                "train_capacity_factor": None,
                "eval_capacity_factor": None,
            },
            "moe.dispatch",
        ),
        ({"num_experts": 4, "dispatch": "dropless"}, "moe.train_capacity_factor"),
        ({"num_experts": 4, "dispatch": "scatter"}, "moe.dispatch"),
        ({"num_experts": 4, "router": "random"}, "moe.router"),
        ({"num_experts": 4, "priority": "fifo"}, "moe.priority"),
        ({"num_experts": 4, "activation": "relu6"}, "moe.activation"),
        ({"num_experts": 4, "dtype": "float16"}, "moe.dtype"),
        ({"num_experts": 4, "group_size": 0}, "moe.group_size"),
        ({"num_experts": 4, "top_k": 1, "score": "sigmoid"}, "moe.score"),
    ],
)
def test_bad_config_raises_named_error(kwargs, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")) as info:
    MoEConfig(expert_hidden=8, **kwargs)
  if kwargs.get("score") == "sigmoid":  # Every gate would be 1.0: the router learns nothing.
    assert "moe.top_k >= 2" in str(info.value)
    MoEConfig(expert_hidden=8, **{**kwargs, "top_k": 2})
  if "dispatch" in kwargs and kwargs["dispatch"] == "scatter":
    assert "'einsum'" in str(info.value) and "'dropless'" in str(info.value)
