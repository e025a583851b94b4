"""Regimes for the sparse-vs-dense question (docs/RESULTS.md, finding a): where does sparse win?

  python -m experiments.train --config=configs/regimes.py:regime=stdlib_e16_every1 --workdir=runs/r
  python -m research.sweep --config=configs/regimes.py --seeds=0,1,2 --baselines=active_flops \
      --root=runs/sweeps/regimes     # every regime (no regime= given), each with its dense baseline

Arguments (comma-separated key=value):
  regime: a key of REGIMES (required for get_config; a sweep without it runs them all).
  size: smoke | tiny | ... (default tiny): the model shape; the regime sets data, layout and steps.

Every regime is the Switch model of configs/switch.py (top-1, capacity factor 1.25 train / 2.0 eval,
balance loss 1e-2, z-loss 1e-3, the size's learning rate and warm-up) with the levers below changed.
MAIN is the regime `./run.sh main` (experiments/compare.py) runs: the strongest that fits about 10
minutes on 2 cores for the sparse model and its baseline together. RECIPE_BASE is the regime the
recipe families of configs/ablations.py change one knob of.
"""

from __future__ import annotations

import dataclasses

from configs import arguments, builders
from moe.config.layer import MoEConfig


@dataclasses.dataclass(frozen=True)
class Regime:
  """The levers of one regime (the rest is configs/switch.py's default)."""

  data: str  # configs.sizes.DATA key.
  experts: int
  sparse_every: int  # 1: every layer sparse; 2: every other layer (Switch).
  steps: int
  top_k: int = 1
  dispatch: str = "gather"  # dropless: no capacity, no drops.
  expert_hidden: int | None = None  # None: the size's mlp_hidden.
  shared_hidden: int = 0  # Width of an always-on shared expert beside the routed ones (0: none).
  group_size: int | None = (
      None  # Tokens per routing group; None: one sequence (128 tokens at tiny).
  )
  d_model: int | None = None  # None: the size's width; else this width, 32-wide heads, 4x MLP.
  why: str = ""


REGIMES: dict[str, Regime] = {
    "shakespeare_e8_every2": Regime(
        "shakespeare", 8, 2, 400, why="The README's former main job: switch-8 tiny, 400 steps."
    ),
    "shakespeare_e8_every2_group4096": Regime(
        "shakespeare",
        8,
        2,
        400,
        group_size=4096,
        why="shakespeare_e8_every2 routed in groups of the whole batch (32 x 128 tokens) instead of one"
        " sequence: with 128-token groups an expert expects 16 tokens and has 20 slots, so chance"
        " alone overflows it (Poisson); GShard and flaxformer route groups of thousands of tokens.",
    ),
    "stdlib_e8_every2": Regime(
        "python_stdlib", 8, 2, 400, why="The same model on a corpus six times larger."
    ),
    "stdlib_e16_every1": Regime(
        "python_stdlib",
        16,
        1,
        2000,
        why="Every layer sparse, twice the experts, five times the tokens: more parameters where"
        " the data can use them.",
    ),
    "stdlib_e16_every1_group4096": Regime(
        "python_stdlib",
        16,
        1,
        2000,
        group_size=4096,
        why="stdlib_e16_every1 routed in groups of the whole batch: with 128-token groups its experts"
        " expect 8 tokens for 10 slots and 17-22% of training claims dropped in every layer (seed 0).",
    ),
    "stdlib_e16_every1_4000": Regime(
        "python_stdlib",
        16,
        1,
        4000,
        why="stdlib_e16_every1 for twice the tokens: its gap to dense narrowed from 0.067 at step 500"
        " to 0.044 at step 1000 (seed 0), so does it close or cross with more tokens?",
    ),
    "stdlib_shared_e16_every1": Regime(
        "python_stdlib",
        16,
        1,
        2000,
        expert_hidden=256,
        shared_hidden=256,
        why="Half of each FFN always on (a shared expert, DeepSeekMoE) and half routed to one of 16"
        " experts of half the width: the same active width as dense, and no layer loses its whole"
        " FFN to a dropped or badly routed token.",
    ),
    "stdlib_d64_e16_every1_group4096": Regime(
        "python_stdlib",
        16,
        1,
        4000,
        group_size=4096,
        d_model=64,
        why="A model half as wide (0.3M parameters dense) for twice the steps: a dense model that"
        " many tokens per parameter make parameter-bound, where the experts' parameters should pay"
        " most (Clark et al. 2022: routing gains shrink as the dense model grows).",
    ),
    "stdlib_d64_e16_every1_group4096_1000": Regime(
        "python_stdlib",
        16,
        1,
        1000,
        group_size=4096,
        d_model=64,
        why="stdlib_d64_e16_every1_group4096 (where sparse wins by 0.07 after 4000 steps) for a quarter"
        " of the steps, its schedule ending at 1000: the main job, a pair that fits about 10 minutes on"
        " 2 cores.",
    ),
    "stdlib_d64_shared_e32_every1_group4096_1000": Regime(
        "python_stdlib",
        32,
        1,
        1000,
        expert_hidden=128,
        shared_hidden=128,
        group_size=4096,
        d_model=64,
        why="stdlib_d64_e16_every1_group4096_1000 with DeepSeekMoE's layout (one always-on shared"
        " expert of width 128 beside 32 routed experts of width 128, top-1: the same active width):"
        " the best of the routing recipes measured on that regime (docs/RESULTS.md, i), so the"
        " main job; its committed seeds (3, 4, 5) are not those the recipe sweep selected it on.",
    ),
    # Dropless is left out on the CPU: jax.lax.ragged_dot ran the E=16 every-layer step at 4.3x the
    # gather step time here (benchmarks.train_step, 2026-11-26), so 2000 steps exceed 30 minutes.
}
MAIN = "stdlib_d64_shared_e32_every1_group4096_1000"
# The regime the routing-recipe families of configs/ablations.py start from (Switch-style top-1).
RECIPE_BASE = "stdlib_d64_e16_every1_group4096_1000"
# Evaluations per run: the loss curves are read at these points, and the compute a dense model needs
# to reach a loss is interpolated between them (`research.report`), so they must be dense in log-FLOPs
# too: with 20 points the last decade of steps holds 18 of them.
EVAL_POINTS = 20


def sweep(arg: str | None = None) -> list[str]:
  """A sweep over `arg` runs the one regime given, else every regime."""
  args = _parse(arg)
  if args["regime"]:
    return [arg]
  return [f"regime={name},size={args['size']}" for name in REGIMES]


def _parse(arg: str | None) -> dict:
  return arguments.parse_arg(
      arg, {"regime": arguments.Arg("", ("",) + tuple(REGIMES)), "size": arguments.SIZE_ARG}
  )


def get_config(arg: str | None = None):
  """Args: arg: the argument string above (regime is required)."""
  args = _parse(arg)
  if not args["regime"]:
    raise ValueError(f"config argument regime is required; allowed values: {', '.join(REGIMES)}")
  return regime_config(REGIMES[args["regime"]], args["size"], f"{args['regime']}_{args['size']}")


def regime_config(r: Regime, size: str, name: str):
  """The Switch model of configs/switch.py at `size` with the levers of `r` set, named `name`."""
  cd = builders.switch_config(size, r.data, experts=r.experts, dispatch=r.dispatch)
  if r.d_model:
    cd.model.d_model, cd.model.num_heads = r.d_model, r.d_model // 32
    cd.model.mlp_hidden = 4 * r.d_model
  cd.model.sparse_every = r.sparse_every
  cd.model.moe.top_k = r.top_k
  cd.model.moe.expert_hidden = r.expert_hidden or cd.model.mlp_hidden
  cd.model.moe.shared_expert_hidden = r.shared_hidden
  if size != "smoke":  # A batch-sized group needs the size's batch.
    cd.model.moe.group_size = r.group_size
  cd.model.moe.allow_noncausal_routing = not MoEConfig(**cd.model.moe).routing_is_causal
  if size != "smoke":  # Smoke keeps its seconds-long schedule (tests).
    cd.train.steps = r.steps
    cd.train.eval_every = max(1, r.steps // EVAL_POINTS)
    cd.train.checkpoint_every = min(500, r.steps)
  cd.name = name
  return cd
