"""Top-2 routing (GShard, Lepikhin et al. 2020): each token goes to its two most probable experts.

  python -m experiments.train --config=configs/top2.py:size=tiny --workdir=runs/top2_tiny
  python -m experiments.train --config=configs/top2.py:size=tiny,dispatch=einsum --workdir=runs/top2_e

Arguments (comma-separated key=value):
  size: smoke | tiny | small | base | large (default tiny; see configs.sizes.SIZES).
  data: shakespeare | python_stdlib | lm1b | c4 (default shakespeare).
  experts: number of experts E (default 8).
  dispatch: gather | einsum | dropless (default gather).
Gates are the raw softmax probabilities (not renormalised over the two, as flaxformer). Capacity
C = ceil(cf * k * S / E) already counts both choices, so the Switch capacity factors are kept (1.25 train,
2.0 eval); flaxformer, which has no k in C, doubles cf instead.
"""

from configs import arguments, builders


def get_config(arg: str | None = None):
  """Args: arg: the argument string above ('' or None: top-2 of 8 experts, tiny, shakespeare)."""
  args = arguments.parse_arg(
      arg,
      {
          "size": arguments.SIZE_ARG,
          "data": arguments.DATA_ARG,
          "experts": arguments.Arg(8, kind=int, minimum=2),
          "dispatch": arguments.DISPATCH_ARG,
      },
  )
  cd = builders.top2_config(
      args["size"], args["data"], experts=args["experts"], dispatch=args["dispatch"]
  )
  return cd
