"""Dense decoder baselines.

  python -m experiments.train --config=configs/dense.py:size=tiny --workdir=runs/dense_tiny
  python -m experiments.train --config=configs/dense.py:size=tiny,match=switch8 --workdir=runs/dense_m8

Arguments (comma-separated key=value):
  size: smoke | tiny | small | base | large (default tiny; see configs.sizes.SIZES).
  data: shakespeare | python_stdlib | lm1b | c4 (default shakespeare).
  match: the name of a sparse config (switch4 ... switch64, top2, expert_choice; see
    moe.builders.NAMED_SPARSE): the dense model whose training FLOPs per token, as computed (router,
    capacity slack and dispatch included; moe.accounting), equal that sparse model's.
  match_params: the same, matched on total parameters instead.
  match_active_params: the same, matched on active parameters (k experts, no capacity slack: the Switch
    paper's "FLOP-matched" T5 baseline).
Only mlp_hidden changes (rounded to a multiple of 8); see moe.baselines.matched_dense.
"""

from configs import arguments, builders
from moe import baselines

_NAMES = ("",) + builders.NAMED_SPARSE
_MATCH_KEYS = {"match": "active_flops", "match_params": "total_params",
               "match_active_params": "active_params"}


def get_config(arg: str | None = None):
  """Args: arg: the argument string above ('' or None: dense tiny on shakespeare)."""
  args = arguments.parse_arg(arg, {
      "size": arguments.SIZE_ARG, "data": arguments.DATA_ARG,
      **{key: arguments.Arg("", _NAMES) for key in _MATCH_KEYS}})
  given = [key for key in _MATCH_KEYS if args[key]]
  if len(given) > 1:
    raise ValueError(f"config arguments {' and '.join(given)} exclude each other: give one")
  if not given:
    return builders.dense_config(args["size"], args["data"])
  sparse = builders.named_sparse(args[given[0]], args["size"], args["data"])
  return baselines.matched_dense(sparse, _MATCH_KEYS[given[0]])
