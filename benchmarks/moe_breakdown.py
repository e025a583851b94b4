"""Where the time of one MoE layer goes: router and slots, dispatch/combine, expert matmuls.

    python -m benchmarks.moe_breakdown --preset=gpu --experts=64 --top_k=1

Each row is forward + backward of one piece on its own, with the same shapes as in the full layer
(median ms; `benchmarks.moe_layer` for the method). The pieces do not add up exactly to the layer: XLA
fuses across their boundaries. The shapes are the preset's; E defaults to its largest.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import benchmarks
from benchmarks.layer_timing import DTYPES, PRESETS, LayerShape, build, grad_fn, time_fn
from moe.config.layer import capacity
from moe.layers import dispatch, routing

_PRESET = flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Shapes (benchmarks.layer_timing).")
_EXPERTS = flags.DEFINE_integer(
    "experts", None, "E (default: the preset's largest).", lower_bound=1
)
_TOP_K = flags.DEFINE_integer("top_k", 1, "k, experts per token.", lower_bound=1)
_CAPACITY_FACTOR = flags.DEFINE_float("capacity_factor", 1.0, "Capacity factor (> 0).")
flags.register_validator("capacity_factor", lambda cf: cf > 0, message="must be > 0")
_ITERS = flags.DEFINE_integer(
    "iters", None, "Timed calls (default: the preset's); the median is reported.", lower_bound=1
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  p = PRESETS[_PRESET.value]
  e = _EXPERTS.value or p["experts"][-1]
  k, iters = _TOP_K.value, _ITERS.value or p["iters"]
  if k > e:
    sys.exit(f"benchmarks.moe_breakdown: --top_k={k} must be at most --experts={e}")
  dtype = DTYPES[p["dtype"]]
  shape = LayerShape(
      d_model=p["d_model"],
      hidden=p["hidden"],
      activation="gelu",
      dtype=p["dtype"],
      capacity_factor=_CAPACITY_FACTOR.value,
  )
  b, s, d = p["tokens"] // p["seq_len"], p["seq_len"], p["d_model"]
  c = capacity(s, e, k, _CAPACITY_FACTOR.value, 0)
  x = jax.random.normal(jax.random.key(0), (b, s, d), dtype)
  rows = []

  for path in ("dense", "einsum", "gather"):
    module, apply = build(path, e, k, shape)
    fn, params = grad_fn(module, apply)
    rows.append((f"layer: {path}", time_fn(fn, params, x, iters=iters)))

  layer, _ = build("gather", e, k, shape)
  experts = layer.experts
  buffers = jax.random.normal(jax.random.key(1), (b, e, c, d), dtype)
  fn, params = grad_fn(experts, lambda m, x: m(x))
  rows.append((f"experts on [G={b}, E={e}, C={c}, d]", time_fn(fn, params, buffers, iters=iters)))

  router = layer.router

  def route(m, x):
    probs = jax.nn.softmax(m(x), axis=-1)
    top = routing.tokens_choose(probs, k, False)
    order = routing.priority_order(probs, layer.cfg.priority)
    slots = dispatch.slots_by_sort(top.expert_index, order, e)
    return jnp.sum(top.gates * (slots < c))

  graphdef, rparams = nnx.split(router, nnx.Param)
  route_fn = jax.jit(jax.grad(lambda p, x: route(nnx.merge(graphdef, p), x), argnums=(0, 1)))
  rows.append(("router + top-k + slots (sort)", time_fn(route_fn, rparams, x, iters=iters)))

  probs = jax.nn.softmax(jax.random.normal(jax.random.key(2), (b, s, e)), axis=-1)
  top = routing.tokens_choose(probs, k, False)
  order = routing.priority_order(probs, layer.cfg.priority)
  identity = lambda buf: buf
  for name, run in (("einsum", dispatch.einsum_moe), ("gather", dispatch.gather_moe)):
    f = jax.jit(
        jax.grad(
            lambda x, g: jnp.sum(
                run(x, top.expert_index, g, order, c, e, identity)[0].astype(jnp.float32)
            ),
            argnums=(0, 1),
        )
    )
    rows.append((f"dispatch + combine only: {name}", time_fn(f, x, top.gates, iters=iters)))

  device = jax.devices()[0]
  print(
      f"# {device.device_kind}; T={b * s} (groups of {s}), d={d}, f={p['hidden']}, E={e}, k={k}, "
      f"C={c}, {p['dtype']}, forward+backward, median of {iters}"
  )
  for name, ms in rows:
    print(f"{name:<44}{ms:>10.2f} ms")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=benchmarks.flags_parser("benchmarks.moe_breakdown"))
