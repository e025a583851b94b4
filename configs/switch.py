"""Switch Transformer decoder (Fedus et al. 2021): top-1 routing, sparse every other layer.

  python -m experiments.train --config=configs/switch.py:size=smoke --workdir=runs/switch_smoke
  python -m experiments.train --config=configs/switch.py:size=tiny,experts=8 --workdir=runs/switch8_tiny
  python -m experiments.train --config=configs/switch.py:size=tiny \
      --config.model.moe.num_experts=16 --config.model.moe.dispatch=einsum --workdir=runs/switch16

Arguments (comma-separated key=value):
  size: smoke | tiny | small | base | large (default tiny; see configs.sizes.SIZES).
  data: shakespeare | python_stdlib | lm1b | c4 (default shakespeare).
  experts: number of experts E (default 8).
  dispatch: gather | einsum | dropless (default gather; dropless sets no capacity).
Defaults: expert width = mlp_hidden, train/eval capacity factor 1.25/2.0, balance loss 1e-2, router
z-loss 1e-3 (ST-MoE), tokens in sequence order claim slots first.
"""

from configs import arguments, builders


def get_config(arg: str | None = None):
  """Args: arg: the argument string above ('' or None: switch-8 tiny on shakespeare)."""
  args = arguments.parse_arg(
      arg,
      {
          "size": arguments.SIZE_ARG,
          "data": arguments.DATA_ARG,
          "experts": arguments.Arg(8, kind=int, minimum=1),
          "dispatch": arguments.DISPATCH_ARG,
      },
  )
  cd = builders.switch_config(
      args["size"], args["data"], experts=args["experts"], dispatch=args["dispatch"]
  )
  return cd
