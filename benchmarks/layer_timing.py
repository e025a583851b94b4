"""What the layer benchmarks (`benchmarks.moe_layer`, `benchmarks.moe_breakdown`) share: the shapes of
each preset, the layer of each dispatch path, and how a jitted forward + backward is timed.

No flags here: each benchmark defines its own, and two modules defining one absl flag cannot both be
imported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.enums import Activation, GroupedMatmul
from moe.config.layer import MoEConfig
from moe.kernels import grouped_matmul
from moe.layers.ffn import MLP
from moe.layers.moe_layer import MoEFeedForward

PRESETS = {
    "cpu": dict(
        tokens=2048,
        seq_len=256,
        d_model=256,
        hidden=512,
        experts=[8],
        top_k=[1, 2],
        dtype="float32",
        iters=5,
    ),
    "gpu": dict(
        tokens=16384,
        seq_len=1024,
        d_model=2048,
        hidden=4096,
        experts=[8, 64],
        top_k=[1, 2],
        dtype="bfloat16",
        iters=20,
    ),
    "gpu-large": dict(
        tokens=32768,
        seq_len=1024,
        d_model=4096,
        hidden=8192,
        experts=[8, 64],
        top_k=[2],
        dtype="bfloat16",
        iters=10,
    ),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DROPLESS = "dropless-"
PATHS = ("dense", "einsum", "gather") + tuple(DROPLESS + g.value for g in GroupedMatmul)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerShape:
  """The layer every path builds: model width, one expert's hidden width f (the dense baseline has
  k * f), activation, dtype, and the capacity factor of the capacity paths (None: nothing drops)."""

  d_model: int
  hidden: int
  activation: str = "gelu"
  dtype: str = "float32"
  capacity_factor: float | None = 1.0


def grad_fn(module: nnx.Module, apply: Callable) -> tuple[Callable, nnx.State]:
  """(jitted (params, x) -> gradients of mean(y^2) with respect to both, the module's params)."""
  graphdef, params = nnx.split(module, nnx.Param)

  def loss(params, x):
    y = apply(nnx.merge(graphdef, params), x)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def time_fn(fn, *args, iters: int) -> float:
  """Median milliseconds of fn(*args) after two warm-up calls (compile, then a steady-state call)."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def unavailable(path: str) -> str | None:
  """Why `path` cannot run on this backend (a grouped matmul that is not available), or None."""
  if not path.startswith(DROPLESS):
    return None
  try:
    grouped_matmul.resolve(path[len(DROPLESS) :])
  except ValueError as e:
    return str(e)
  return None


def build(path: str, experts: int, top_k: int, shape: LayerShape) -> tuple[nnx.Module, Callable]:
  """The layer of one path and how to apply it to x [B, S, d] (S tokens a routing group).

  Args:
    path: one of `PATHS`: `dense` (an MLP of width top_k * hidden), a capacity dispatch (`einsum`,
      `gather`) or `dropless-<moe.grouped_matmul>`.
    experts, top_k: E and k of the MoE layer.
    shape: the widths, activation, dtype and capacity factor.
  """
  dtype = DTYPES[shape.dtype]
  rngs = nnx.Rngs(0)
  with nnx.use_eager_sharding(False):
    if path == "dense":
      mlp = MLP(
          shape.d_model, top_k * shape.hidden, Activation(shape.activation), dtype=dtype, rngs=rngs
      )
      return mlp, lambda m, x: m(x)
    dropless = path.startswith(DROPLESS)
    cf = None if dropless else shape.capacity_factor
    cfg = MoEConfig(
        num_experts=experts,
        top_k=top_k,
        expert_hidden=shape.hidden,
        dispatch="dropless" if dropless else path,
        grouped_matmul=path[len(DROPLESS) :] if dropless else GroupedMatmul.AUTO,
        train_capacity_factor=cf,
        eval_capacity_factor=cf,
        activation=shape.activation,
        dtype=shape.dtype,
        min_capacity=0,
    )
    module = MoEFeedForward(cfg, shape.d_model, rngs=rngs)
  return module, lambda m, x: m(x, train=True)[0]
