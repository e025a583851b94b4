"""Ablation families around the Switch model: one knob per family, everything else at its default.

  python -m experiments.train --config=configs/ablations.py:family=experts,member=16 \
      --workdir=runs/abl/experts-16

Arguments (comma-separated key=value):
  family: which knob (see FAMILIES below; `members(family)` lists the values).
  member: one value of that knob (default: the family's first member).
  size: smoke | tiny | small | base | large (default tiny).  data: as configs/switch.py.
  group: tokens per routing group, e.g. 4096 (the tiny batch, 32 x 128); default: one sequence.
    Small groups overflow experts by chance alone, more so the more experts (docs/RESULTS.md, a).
  capacity: a member of the capacity family applied to every member of another family, e.g.
    family=experts,capacity=dropless (default: the switch config's 1.25 train / 2.0 eval).

A sweep runs every member (no member= given) over seeds, with matched dense baselines, and a report
aggregates it (see research/sweep.py and research/report.py):

  python -m research.sweep --config=configs/ablations.py:family=experts --seeds=0,1,2 \
      --baselines=active_flops --root=runs/sweeps/experts
  python -m research.report runs/sweeps/experts

Families (base: configs/switch.py, 8 experts, top-1, gather, cf 1.25/2.0, balance 1e-2, z-loss 1e-3):
  experts   E in 2, 4, 8, 16, 32 (Switch Transformer Fig. 4: more experts at fixed FLOPs per token).
  capacity  train capacity factor 0.5, 1.0, 1.25, 2.0 or dropless (Switch Table 1).
  dispatch  gather, einsum, dropless: the same function, different cost (see benchmarks/).
  priority  index vs batch_prioritized buffer priority (Riquelme et al. 2021, BPR).
  zloss     router z-loss weight 0, 1e-4, 1e-3, 1e-2 (ST-MoE, Zoph et al. 2022, Table 4).
  balance   load-balancing loss weight 0, 1e-3, 1e-2, 1e-1 (Switch Sec. 2.2 uses 1e-2).
  topk      k in 1, 2, 4 experts per token (8 experts; capacity scales with k).
  every     sparse_every 1, 2, 4: which fraction of layers are sparse.
  jitter    router input jitter eps 0, 0.01, 0.1 (Switch Sec. 2.4).
  router    tokens_choose (top-2) vs experts_choose (EC-CF2), both at capacity factor 1.0: the same
            compute per token (2 expert evaluations).

Recipe families (the base: configs/regimes.py's RECIPE_BASE, stdlib_d64_e16_every1_group4096_1000:
d=64, 16 experts of the FFN width 256 in every layer, top-1, the whole 4096-token batch one routing
group, 1000 steps; each family's first member is that regime's config unchanged; `data`, `group`
and `capacity` are refused here, the regime sets them; docs/routing.md; `score` stands on G = 2):
  recipe_balance  loss | bias | none: the Switch loss (1e-2), auxiliary-loss-free balancing by a
            selection bias (Wang et al. 2024, rate 1e-3), or nothing.
  score     softmax | sigmoid | sigmoid_bias, all on granularity G = 2 (32 experts of width 128,
            top-2; its softmax member is granularity=2 renamed): sigmoid scores alone (one knob,
            balance loss kept), and DeepSeek-V3's recipe (sigmoid, the bias, its sequence-wise loss
            at alpha = 1e-4). Sigmoid gates are normalised over the k chosen: at k = 1 every gate
            is 1.0 and the router learns nothing from the task loss, so MoEConfig refuses top-1.
  balance_scope  group4096 | group512 | global512: 8 routing groups per batch (512 tokens at tiny)
            with the balance loss per group or pooled over the batch (Qiu et al. 2025); the first is
            the base (one group: the two scopes are the same number there).
  granularity  G = 1 | 2 | 4 | 8: every expert split G ways (E = 16 G experts of width 256 / G, top-G;
            DeepSeekMoE, Krajewski et al. 2024), so the expert FLOPs per token stay those of G = 1;
            served token-major (causal; with k = 1 it is the same order). Any integer G that
            divides the width is accepted, e.g. member=16.
  shared    none | shared128: one always-on shared expert of width 128 beside 32 routed experts of
            width 128, top-1 (DeepSeekMoE's layout): the same active width and routed parameters
            as the base, plus the shared expert's (the main job's regime, configs/regimes.py MAIN).

  python -m research.sweep --config=configs/ablations.py:family=granularity --seeds=0,1,2 \
      --baselines=active_flops --root=runs/sweeps/recipes/granularity
"""

from __future__ import annotations

import configs.expert_choice
import configs.regimes
import configs.switch
from configs import arguments
from moe.config.layer import MoEConfig


def _set_moe(field: str, cast=float):
  def apply(cd, member):
    cd.model.moe[field] = cast(member)

  return apply


def _capacity(cd, member):
  if member == "dropless":
    cd.model.moe.dispatch = "dropless"
    cd.model.moe.train_capacity_factor = None
    cd.model.moe.eval_capacity_factor = None
  else:
    cd.model.moe.train_capacity_factor = float(member)


def _dispatch(cd, member):
  if member == "dropless":
    _capacity(cd, "dropless")
  cd.model.moe.dispatch = member


def _every(cd, member):
  cd.model.sparse_every = int(member)


def _router(cd, member):
  # Both members at capacity factor 1.0 for training and evaluation: E * C / S = 2 expert evaluations
  # per token on both sides (EC-CF2 has C = 2 S / E; top-2 has C = 1.0 * 2 * S / E).
  cd.model.moe.top_k = 2
  cd.model.moe.train_capacity_factor = 1.0
  cd.model.moe.eval_capacity_factor = 1.0
  if member == "experts_choose":
    ec = configs.expert_choice.get_config().model.moe  # EC-CF2, with the causality acknowledgement.
    for key in (
        "router",
        "train_capacity_factor",
        "eval_capacity_factor",
        "balance_loss_weight",
        "allow_noncausal_routing",
    ):
      cd.model.moe[key] = ec[key]


# family -> (members, how a member changes the switch config).
FAMILIES = {
    "experts": (("2", "4", "8", "16", "32"), _set_moe("num_experts", int)),
    "capacity": (("0.5", "1.0", "1.25", "2.0", "dropless"), _capacity),
    "dispatch": (arguments.DISPATCH_ARG.choices, _dispatch),
    "priority": (("index", "batch_prioritized"), _set_moe("priority", str)),
    "zloss": (("0", "1e-4", "1e-3", "1e-2"), _set_moe("z_loss_weight")),
    "balance": (("0", "1e-3", "1e-2", "1e-1"), _set_moe("balance_loss_weight")),
    "topk": (("1", "2", "4"), _set_moe("top_k", int)),
    "every": (("1", "2", "4"), _every),
    "jitter": (("0", "0.01", "0.1"), _set_moe("jitter_eps")),
    "router": (("tokens_choose", "experts_choose"), _router),
}


def _recipe_balance(cd, member):
  cd.model.moe.balance = member


def _score(cd, member):
  """On granularity G = 2 (32 experts of half width, top-2): sigmoid gates are normalised over the
  chosen experts, so at the base's top-1 every gate is 1.0 and `MoEConfig` refuses it."""
  _granularity(cd, "2")
  if member == "softmax":
    return
  cd.model.moe.score = "sigmoid"
  if member == "sigmoid_bias":  # DeepSeek-V3 Sec. 2.1.2: the bias, and alpha = 1e-4 per sequence.
    cd.model.moe.balance = "bias"
    cd.model.moe.sequence_balance_weight = 1e-4


def _balance_scope(cd, member):
  # 8 groups per batch: 512 tokens at tiny (32 x 128), 64 at smoke (its whole batch is 512).
  cd.model.moe.group_size = cd.train.global_batch_size * cd.train.seq_len // 8
  cd.model.moe.balance_scope = "global" if member == "global512" else "group"


def _granularity(cd, member):
  """Each expert split G ways and k multiplied by G: E * f (total) and k * f (active) unchanged."""
  g, moe = int(member), cd.model.moe
  if moe.expert_hidden % g:
    raise ValueError(
        f"config argument member={member}: granularity G={g} must divide "
        f"moe.expert_hidden={moe.expert_hidden} (the width of each expert is expert_hidden / G)"
    )
  moe.num_experts, moe.expert_hidden, moe.top_k = moe.num_experts * g, moe.expert_hidden // g, g
  if g > 1:  # Top-G with a capacity: token-major serving keeps the routing causal.
    moe.serving_order = "token_major"


def _shared(cd, member):
  """Half the width always on, the other half routed to one of twice the experts (DeepSeekMoE)."""
  moe = cd.model.moe
  half = moe.expert_hidden // 2
  moe.shared_expert_hidden, moe.expert_hidden, moe.num_experts = half, half, 2 * moe.num_experts


def _granularity_member(member: str) -> bool:
  return member.isdigit() and int(member) >= 1


# family -> (members, how a member changes the RECIPE_BASE regime's config); the first member changes
# nothing but in `score`, whose members all stand on granularity G = 2 (sigmoid scores need k >= 2).
RECIPE_FAMILIES = {
    "recipe_balance": (("loss", "bias", "none"), _recipe_balance),
    "score": (("softmax", "sigmoid", "sigmoid_bias"), _score),
    "balance_scope": (
        ("group4096", "group512", "global512"),
        lambda cd, m: m != "group4096" and _balance_scope(cd, m),
    ),
    "granularity": (("1", "2", "4", "8"), _granularity),
    "shared": (("none", "shared128"), lambda cd, m: m != "none" and _shared(cd, m)),
}
ALL_FAMILIES = (*FAMILIES, *RECIPE_FAMILIES)


def members(family: str) -> tuple[str, ...]:
  """The member names of a family, in sweep order.

  Args:
    family: a key of FAMILIES or RECIPE_FAMILIES.
  """
  if family not in ALL_FAMILIES:
    raise ValueError(f"family={family!r} is not one of {', '.join(ALL_FAMILIES)}")
  return {**FAMILIES, **RECIPE_FAMILIES}[family][0]


def sweep(arg: str | None = None) -> list[str]:
  """The arguments of the configs a sweep over `arg` runs: every member unless one is given."""
  args = _parse(arg)
  if args["member"]:
    return [arg]
  base = ",".join(f"{k}={v}" for k, v in args.items() if v and k != "member")
  return [f"{base},member={m}" for m in members(args["family"])]


def _parse(arg: str | None) -> dict:
  args = arguments.parse_arg(
      arg,
      {
          "family": arguments.Arg("", ALL_FAMILIES),
          "member": arguments.Arg(""),
          "size": arguments.SIZE_ARG,
          "data": arguments.Arg("", arguments.DATA_ARG.choices),  # "": the family's own.
          "group": arguments.Arg(None, kind=int, minimum=1),
          "capacity": arguments.Arg(None, FAMILIES["capacity"][0]),
      },
  )
  if not args["family"]:
    raise ValueError(
        f"config argument family is required; allowed values: {', '.join(ALL_FAMILIES)}"
    )
  if args["capacity"] and args["family"] in ("capacity", "dispatch"):
    raise ValueError(f"config argument capacity is for the other families, not {args['family']}")
  if args["family"] in RECIPE_FAMILIES:
    for key in ("data", "group", "capacity"):
      if args[key]:
        raise ValueError(
            f"config argument {key} is not for family {args['family']}: its members are the "
            f"{configs.regimes.RECIPE_BASE} regime's config, which sets it"
        )
  return args


def _recipe_config(family: str, member: str, size: str):
  """The RECIPE_BASE regime's config at `size` with a recipe family's member applied."""
  allowed, apply = RECIPE_FAMILIES[family]
  if member not in allowed and not (family == "granularity" and _granularity_member(member)):
    raise ValueError(
        f"config argument member={member!r} is not a member of family {family}; "
        f"member must be one of {', '.join(allowed)}"
        + (" (or any integer G >= 1 that divides the expert width)" * (family == "granularity"))
    )
  regime = configs.regimes.REGIMES[configs.regimes.RECIPE_BASE]
  cd = configs.regimes.regime_config(regime, size, f"{family}-{member}_{size}")
  apply(cd, member)
  cd.model.moe.allow_noncausal_routing = not MoEConfig(**cd.model.moe).routing_is_causal
  return cd


def get_config(arg: str | None = None):
  """Args: arg: the argument string above (family is required)."""
  args = _parse(arg)
  family, member = args["family"], args["member"] or members(args["family"])[0]
  if family in RECIPE_FAMILIES:
    return _recipe_config(family, member, args["size"])
  allowed, apply = FAMILIES[family]
  if member not in allowed:
    raise ValueError(
        f"config argument member={member!r} is not a member of family {family}; "
        f"member must be one of {', '.join(allowed)}"
    )
  data = args["data"] or arguments.DATA_ARG.default
  cd = configs.switch.get_config(f"size={args['size']},data={data}")
  apply(cd, member)
  suffix = ""
  if args["capacity"]:
    _capacity(cd, args["capacity"])
    suffix += f"_capacity-{args['capacity']}"
  if args["group"]:
    cd.model.moe.group_size = args["group"]
    suffix += f"_group{args['group']}"
  # Members whose routing is not causal (top-k > 1 or batch-prioritised order with a capacity, experts
  # choose) run as the papers ran them, with the acknowledgement (MoEConfig.routing_is_causal).
  cd.model.moe.allow_noncausal_routing = not MoEConfig(**cd.model.moe).routing_is_causal
  cd.name = f"{family}-{member}{suffix}_{args['size']}"
  return cd
