"""Sparse upcycling (Komatsuzaki et al. 2022): continue a trained dense run, as a sparse model or as
itself, for the same extra steps under the same fresh schedule (`moe.models.upcycle`).

  python -m experiments.train --config=configs/dense.py:size=tiny --workdir=runs/dense_tiny
  python -m experiments.train --config=configs/upcycle.py:size=tiny \
      --config.train.init_from=runs/dense_tiny --workdir=runs/upcycled_tiny
  python -m experiments.train --config=configs/upcycle.py:size=tiny,arm=dense \
      --config.train.init_from=runs/dense_tiny --workdir=runs/continued_tiny

Arguments (comma-separated key=value):
  size: smoke | tiny | small | base | large (default tiny; the dense run's size).
  data: shakespeare | python_stdlib | lm1b | c4 (default shakespeare).
  arm: sparse (default): top-2 of `experts` experts, every other layer, gates renormalised over the
    two, dropless; dense: the dense model itself (its parameters copied).
  experts: number of experts E of the sparse arm (default 8).
  steps: the extra steps M (default half the size's steps: 200 at tiny).
Both arms start from the dense run's last checkpoint with a fresh AdamW state and the size's warmup and
cosine decay over the M steps, and read the same batches: they differ only in the model. Top-2 because
the paper's decoders route top-2 and, renormalised, its gates stay trainable (top-1 renormalised is a
gate of 1: the router would learn from the balance loss only); dropless because top-2 with a capacity is
not causal in a decoder and could drop tokens at step 0. The measurement's commands (3 seeds) are in
moe/models/upcycle.py's docstring.
"""

from configs import arguments, builders
from configs.sizes import SIZES


def get_config(arg: str | None = None):
  """Args: arg: the argument string above ('' or None: the sparse arm, tiny, shakespeare)."""
  args = arguments.parse_arg(
      arg,
      {
          "size": arguments.SIZE_ARG,
          "data": arguments.DATA_ARG,
          "arm": arguments.Arg("sparse", ("sparse", "dense")),
          "experts": arguments.Arg(8, kind=int, minimum=2),
          "steps": arguments.Arg(None, kind=int, minimum=1),
      },
  )
  size, name = args["size"], f"upcycle_{args['arm']}_{args['size']}"
  if args["arm"] == "dense":
    cd = builders.dense_config(size, args["data"], name=name)
  else:
    cd = builders.sparse_config(
        size,
        args["data"],
        name=name,
        num_experts=args["experts"],
        top_k=2,
        dispatch="dropless",
        renormalize_gates=True,
    )
  steps = args["steps"] or SIZES[size].steps // 2
  cd.train.steps = steps
  cd.train.warmup_steps = min(cd.train.warmup_steps, steps)
  return cd
