"""Dense decoder baselines.

  python -m experiments.train --config=configs/dense.py:size=tiny --workdir=runs/dense_tiny
  python -m experiments.train --config=configs/dense.py:size=tiny,match=switch8 --workdir=runs/dense_m8

Arguments (comma-separated key=value):
  size: smoke | tiny | small | base | large (default tiny; see configs.sizes.SIZES).
  data: shakespeare | python_stdlib | lm1b | c4 (default shakespeare).
  match: the name of a sparse config (switch4 ... switch64, top2, expert_choice; see
    NAMED_SPARSE below): the dense model whose training FLOPs per token, as computed (router,
    capacity slack and dispatch included; moe.models.accounting), equal that sparse model's.
  match_params: the same, matched on total parameters instead.
  match_active_params: the same, matched on active parameters (k experts, no capacity slack: the Switch
    paper's "FLOP-matched" T5 baseline).
Only mlp_hidden changes (rounded to a multiple of 8); see research.baselines.matched_dense.
"""

import configs.expert_choice
import configs.switch
import configs.top2
from configs import arguments, builders
from research import baselines

# Sparse configs a dense baseline can be matched to: the default config of configs/switch.py with E
# experts (switch<E>), of configs/top2.py and of configs/expert_choice.py.
NAMED_SPARSE = ("switch4", "switch8", "switch16", "switch32", "switch64", "top2", "expert_choice")
_NAMES = ("",) + NAMED_SPARSE
_MATCH_KEYS = {
    "match": "active_flops",
    "match_params": "total_params",
    "match_active_params": "active_params",
}


def get_config(arg: str | None = None):
  """Args: arg: the argument string above ('' or None: dense tiny on shakespeare)."""
  args = arguments.parse_arg(
      arg,
      {
          "size": arguments.SIZE_ARG,
          "data": arguments.DATA_ARG,
          **{key: arguments.Arg("", _NAMES) for key in _MATCH_KEYS},
      },
  )
  given = [key for key in _MATCH_KEYS if args[key]]
  if len(given) > 1:
    raise ValueError(f"config arguments {' and '.join(given)} exclude each other: give one")
  if not given:
    return builders.dense_config(args["size"], args["data"])
  sparse = named_sparse(args[given[0]], args["size"], args["data"])
  return baselines.matched_dense(sparse, on=_MATCH_KEYS[given[0]])


def named_sparse(name: str, size: str, data: str):
  """The sparse config named `name` (one of `NAMED_SPARSE`) at a size and on a corpus."""
  common = f"size={size},data={data}"
  if name == "top2":
    return configs.top2.get_config(common)
  if name == "expert_choice":
    return configs.expert_choice.get_config(common)
  return configs.switch.get_config(f"{common},experts={name.removeprefix('switch')}")
