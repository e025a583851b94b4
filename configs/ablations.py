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
"""

from __future__ import annotations

import configs.expert_choice
import configs.switch
from configs import arguments
from moe.config.model import MoEConfig


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


def members(family: str) -> tuple[str, ...]:
  """The member names of a family, in sweep order.

  Args:
    family: a key of FAMILIES.
  """
  if family not in FAMILIES:
    raise ValueError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
  return FAMILIES[family][0]


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
          "family": arguments.Arg("", tuple(FAMILIES)),
          "member": arguments.Arg(""),
          "size": arguments.SIZE_ARG,
          "data": arguments.DATA_ARG,
          "group": arguments.Arg(None, kind=int, minimum=1),
          "capacity": arguments.Arg(None, FAMILIES["capacity"][0]),
      },
  )
  if not args["family"]:
    raise ValueError(f"config argument family is required; allowed values: {', '.join(FAMILIES)}")
  if args["capacity"] and args["family"] in ("capacity", "dispatch"):
    raise ValueError(f"config argument capacity is for the other families, not {args['family']}")
  return args


def get_config(arg: str | None = None):
  """Args: arg: the argument string above (family is required)."""
  args = _parse(arg)
  family, member = args["family"], args["member"] or members(args["family"])[0]
  allowed, apply = FAMILIES[family]
  if member not in allowed:
    raise ValueError(
        f"config argument member={member!r} is not a member of family {family}; "
        f"member must be one of {', '.join(allowed)}"
    )
  cd = configs.switch.get_config(f"size={args['size']},data={args['data']}")
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
