"""The scaling sweep (docs/RESULTS.md, finding h): dense and sparse models across widths and expert
counts, on the Python stdlib, for the compute a dense model needs to reach each sparse model's loss.

  python -m experiments.train --config=configs/scaling.py:d=64,experts=16 --workdir=runs/s
  python -m research.sweep --config=configs/scaling.py --seeds=0 --root=runs/sweeps/scaling

Arguments (comma-separated key=value):
  d: the model width, one of WIDTHS (4 layers, heads of 32, dense FFN and experts 4d wide).
  experts: E, one of EXPERTS; 0 is the dense model of that width.
  size: smoke | tiny (default tiny: 4000 steps of 32 x 128 tokens; smoke: seconds, for tests).

Every sparse model is finding a's winning design (configs/regimes.py
`stdlib_d64_e16_every1_group4096`, which is `d=64,experts=16` here): top-1 Switch routing of E
experts of the dense FFN's width in every layer, the whole 4096-token batch as one routing group,
capacity factor 1.25 train / 2.0 eval, 4000 steps (16M tokens), the same learning rate (3e-3) and
schedule at every width. The dense models of every width are the frontier a sparse model's loss is
read against (`research.report`). A sweep without `d=` / `experts=` runs `GRID`.
"""

from __future__ import annotations

from configs import arguments, regimes

WIDTHS = (32, 64, 96, 128, 192)
EXPERTS = (0, 4, 16, 64)
STEPS = 4000
# (d, E) of the sweep, in the order it runs: the points that answer "does EL grow with E?" and
# "does it shrink with size?" (each read against the dense widths on either side of it), then the
# widest. The grid ends at the sweep's budget, about 5 CPU-hours on a 2-core CPU (its 16 runs: 5.4 h);
# the next points, dense d=192 and sparse d=128 E=16 (about 2 CPU-hours more), run by name:
# --config=configs/scaling.py:d=192,experts=0 --config=configs/scaling.py:d=128,experts=16.
GRID = (
    (32, 0),
    (64, 0),
    (96, 0),
    (64, 16),
    (32, 16),
    (64, 4),
    (64, 64),
    (128, 0),
    (96, 16),
)


def _parse(arg: str | None) -> dict:
  return arguments.parse_arg(
      arg,
      {
          "d": arguments.Arg(None, tuple(map(str, WIDTHS))),
          "experts": arguments.Arg(None, tuple(map(str, EXPERTS))),
          "size": arguments.Arg("tiny", ("smoke", "tiny")),
      },
  )


def sweep(arg: str | None = None) -> list[str]:
  """The configs of a sweep over `arg`: the one given, else every (d, E) of `GRID`."""
  args = _parse(arg)
  if args["d"] is not None and args["experts"] is not None:
    return [arg]
  return [f"d={d},experts={e},size={args['size']}" for d, e in GRID]


def name(d: int, experts: int, size: str) -> str:
  return f"scaling_d{d}_{'dense' if experts == 0 else f'e{experts}'}_{size}"


def get_config(arg: str | None = None):
  """Args: arg: the argument string above (d and experts are required)."""
  args = _parse(arg)
  for key in ("d", "experts"):
    if args[key] is None:
      allowed = WIDTHS if key == "d" else EXPERTS
      raise ValueError(
          f"config argument {key} is required; allowed values: {', '.join(map(str, allowed))}"
      )
  d, experts = int(args["d"]), int(args["experts"])
  regime = regimes.Regime("python_stdlib", max(experts, 1), 1, STEPS, group_size=4096, d_model=d)
  cd = regimes.regime_config(regime, args["size"], name(d, experts, args["size"]))
  if (
      experts == 0
  ):  # The same model with its FFN dense (what research.baselines.matched_dense does).
    cd.model.moe = None
    cd.mesh.rules = "data"
  return cd
