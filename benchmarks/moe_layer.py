"""Forward + backward time of each MoE dispatch path against a dense FFN of equal active FLOPs.

    python -m benchmarks.moe_layer                         # CPU-sized defaults, a table
    python -m benchmarks.moe_layer --json                  # one JSON record per (path, experts, top_k)
    python -m benchmarks.moe_layer --preset=gpu            # T=16384, d=2048, f=4096, E in {8, 64}, k in {1, 2}, bf16

The dense baseline has d_ff = k * f, so at capacity factor 1.0 the experts and the dense FFN do the same
matmul FLOPs; the ratio is the price of routing (router, dispatch, combine, load imbalance). Time is the
median over `--iters` calls of a jitted function returning the gradients with respect to the parameters
and the input. Depends on jax and flax only (the GPU image has no tensorflow-datasets or grain).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config import Activation, MoEConfig
from moe.ffn import MLP
from moe.layer import MoEFeedForward

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
}
PATHS = ("dense", "einsum", "gather", "dropless")


def _grad_fn(module: nnx.Module, apply):
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


def build(path: str, experts: int, top_k: int, args) -> tuple[nnx.Module, callable]:
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  rngs = nnx.Rngs(0)
  with nnx.use_eager_sharding(False):
    if path == "dense":
      return MLP(
          args.d_model, top_k * args.hidden, Activation(args.activation), dtype=dtype, rngs=rngs
      ), lambda m, x: m(x)
    cf = None if path == "dropless" else args.capacity_factor
    cfg = MoEConfig(
        num_experts=experts,
        top_k=top_k,
        expert_hidden=args.hidden,
        dispatch=path,
        train_capacity_factor=cf,
        eval_capacity_factor=cf,
        activation=args.activation,
        dtype=args.dtype,
        min_capacity=0,
    )
    return MoEFeedForward(cfg, args.d_model, rngs=rngs), lambda m, x: m(x, train=True)[0]


def run(args) -> list[dict]:
  records = []
  batch = args.tokens // args.seq_len
  x = jax.random.normal(
      jax.random.key(0),
      (batch, args.seq_len, args.d_model),
      {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype],
  )
  for top_k in args.top_k:
    dense_ms = None
    for experts in args.experts:
      for path in args.paths:
        if path == "dense" and dense_ms is not None:
          continue  # One dense baseline per k.
        module, apply = build(path, experts, top_k, args)
        fn, params = _grad_fn(module, apply)
        ms = time_fn(fn, params, x, iters=args.iters)
        if path == "dense":
          dense_ms = ms
        records.append(
            dict(
                path=path,
                experts=experts if path != "dense" else 0,
                top_k=top_k,
                ms=round(ms, 3),
                ratio_vs_dense=None,
            )
        )
        del fn, params, module
  dense = {r["top_k"]: r["ms"] for r in records if r["path"] == "dense"}
  for r in records:
    if r["top_k"] in dense:
      r["ratio_vs_dense"] = round(r["ms"] / dense[r["top_k"]], 3)
  return records


def check_agreement() -> float:
  """On the current device, in float32 at highest matmul precision: all paths compute one function when
  nothing drops (C = S). Returns the largest relative difference to the EINSUM path."""
  args = argparse.Namespace(
      d_model=64, hidden=128, activation="gelu", dtype="float32", capacity_factor=None
  )
  x = jax.random.normal(jax.random.key(1), (4, 128, 64))
  worst = 0.0
  with jax.default_matmul_precision("highest"):
    for top_k in (1, 2):
      outs = {}
      for path in ("einsum", "gather", "dropless"):
        module, apply = build(path, 8, top_k, args)
        outs[path] = jax.jit(lambda m, x: apply(m, x))(module, x)
      for path in ("gather", "dropless"):
        err = float(
            jnp.max(jnp.abs(outs[path] - outs["einsum"])) / jnp.max(jnp.abs(outs["einsum"]))
        )
        worst = max(worst, err)
  return worst


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--tokens", type=int)
  parser.add_argument("--seq_len", type=int, help="tokens per sequence (= routing group size)")
  parser.add_argument("--d_model", type=int)
  parser.add_argument("--hidden", type=int, help="f, the hidden width of one expert")
  parser.add_argument("--experts", type=int, nargs="+")
  parser.add_argument("--top_k", type=int, nargs="+")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"])
  parser.add_argument("--iters", type=int)
  parser.add_argument("--capacity_factor", type=float, default=1.0)
  parser.add_argument("--activation", default="gelu", choices=[a.value for a in Activation])
  parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
  parser.add_argument("--json", action="store_true", help="one JSON record per line")
  parser.add_argument(
      "--check",
      action="store_true",
      help="first check that the paths agree on this device (float32, no drops)",
  )
  args = parser.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if "dense" not in args.paths:
    args.paths = ["dense"] + list(args.paths)
  if args.tokens % args.seq_len:
    parser.error(f"--tokens={args.tokens} must be a multiple of --seq_len={args.seq_len}")

  if args.check:
    err = check_agreement()
    print(f"# agreement check on {jax.devices()[0].device_kind}: max relative difference {err:.2e}")
    if err > 1e-4:
      raise SystemExit("dispatch paths disagree on this device")
  records = run(args)
  if args.json:
    for r in records:
      print(json.dumps(r))
    return
  device = jax.devices()[0]
  print(
      f"# {device.platform} {device.device_kind}; T={args.tokens} (groups of {args.seq_len}), "
      f"d={args.d_model}, f={args.hidden}, {args.dtype}, cf={args.capacity_factor}, "
      f"forward+backward, median of {args.iters}"
  )
  print(f"{'path':<10}{'experts':>8}{'top_k':>6}{'ms':>11}{'vs dense':>10}")
  for r in records:
    print(
        f"{r['path']:<10}{r['experts']:>8}{r['top_k']:>6}{r['ms']:>11.2f}{r['ratio_vs_dense']:>9.2f}x"
    )


if __name__ == "__main__":
  main()
