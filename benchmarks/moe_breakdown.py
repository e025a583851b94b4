"""Where the time of one MoE layer goes: router and slots, dispatch/combine, expert matmuls.

    python -m benchmarks.moe_breakdown --preset=gpu --experts 64 --top_k 1

Each row is forward + backward of one piece on its own, with the same shapes as in the full layer
(median ms; `benchmarks.moe_layer` for the method). The pieces do not add up exactly to the layer: XLA
fuses across their boundaries.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.moe_layer import PRESETS, _grad_fn, build, time_fn
from moe.config.model import capacity
from moe.layers import dispatch, routing


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--experts", type=int, default=None)
  parser.add_argument("--top_k", type=int, default=1)
  parser.add_argument("--capacity_factor", type=float, default=1.0)
  parser.add_argument("--iters", type=int, default=None)
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  e = args.experts or p["experts"][-1]
  k, iters = args.top_k, args.iters or p["iters"]
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[p["dtype"]]
  ns = argparse.Namespace(
      d_model=p["d_model"],
      hidden=p["hidden"],
      activation="gelu",
      dtype=p["dtype"],
      capacity_factor=args.capacity_factor,
  )
  b, s, d = p["tokens"] // p["seq_len"], p["seq_len"], p["d_model"]
  c = capacity(s, e, k, args.capacity_factor, 0)
  x = jax.random.normal(jax.random.key(0), (b, s, d), dtype)
  rows = []

  for path in ("dense", "einsum", "gather"):
    module, apply = build(path, e, k, ns)
    fn, params = _grad_fn(module, apply)
    rows.append((f"layer: {path}", time_fn(fn, params, x, iters=iters)))

  layer, _ = build("gather", e, k, ns)
  experts = layer.experts
  buffers = jax.random.normal(jax.random.key(1), (b, e, c, d), dtype)
  fn, params = _grad_fn(experts, lambda m, x: m(x))
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


if __name__ == "__main__":
  main()
