"""Forward + backward time of each MoE dispatch path against a dense FFN of equal active FLOPs.

    python -m benchmarks.moe_layer                         # CPU-sized defaults, a table
    python -m benchmarks.moe_layer --json                  # one JSON record per (path, experts, top_k)
    python -m benchmarks.moe_layer --preset=gpu            # T=16384, d=2048, f=4096, E in {8, 64}, k in {1, 2}, bf16
    python -m benchmarks.moe_layer --check                 # first: every path's outputs and gradients
                                                           # against the einsum path, on this device

The dense baseline has d_ff = k * f, so at capacity factor 1.0 the experts and the dense FFN do the same
matmul FLOPs; the ratio is the price of routing (router, dispatch, combine, load imbalance). Time is the
median over `--iters` calls of a jitted function returning the gradients with respect to the parameters
and the input. Paths: `dense`, `einsum`, `gather`, and the dropless dispatch with each grouped matmul
(`dropless-<moe.grouped_matmul>`: `dropless-auto`, `-xla`, `-tokamax`, `-pallas`); one that is not
available on this backend is skipped with a line saying why. Depends on jax and flax only (the GPU
image has no tensorflow-datasets or grain); tokamax where installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.model import Activation, GroupedMatmul, MoEConfig
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
DROPLESS = "dropless-"
PATHS = ("dense", "einsum", "gather") + tuple(DROPLESS + g.value for g in GroupedMatmul)
# Compared with the einsum path: one function when nothing drops (C = S).
CHECKED = tuple(p for p in PATHS if p not in ("dense", "einsum"))


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


def unavailable(path: str) -> str | None:
  """Why `path` cannot run on this backend (a grouped matmul that is not available), or None."""
  if not path.startswith(DROPLESS):
    return None
  try:
    grouped_matmul.resolve(path[len(DROPLESS) :])
  except ValueError as e:
    return str(e)
  return None


def build(path: str, experts: int, top_k: int, args) -> tuple[nnx.Module, callable]:
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  rngs = nnx.Rngs(0)
  with nnx.use_eager_sharding(False):
    if path == "dense":
      return MLP(
          args.d_model, top_k * args.hidden, Activation(args.activation), dtype=dtype, rngs=rngs
      ), lambda m, x: m(x)
    dropless = path.startswith(DROPLESS)
    cf = None if dropless else args.capacity_factor
    cfg = MoEConfig(
        num_experts=experts,
        top_k=top_k,
        expert_hidden=args.hidden,
        dispatch="dropless" if dropless else path,
        grouped_matmul=path[len(DROPLESS) :] if dropless else GroupedMatmul.AUTO,
        train_capacity_factor=cf,
        eval_capacity_factor=cf,
        activation=args.activation,
        dtype=args.dtype,
        min_capacity=0,
    )
    module = MoEFeedForward(cfg, args.d_model, rngs=rngs)
  return module, lambda m, x: m(x, train=True)[0]


def _skip(path: str, reason: str, args) -> None:
  print(f"# skipped {path}: {reason}", file=sys.stderr if args.json else sys.stdout, flush=True)


def run(args) -> list[dict]:
  records = []
  batch = args.tokens // args.seq_len
  x = jax.random.normal(
      jax.random.key(0),
      (batch, args.seq_len, args.d_model),
      {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype],
  )
  paths = [p for p in args.paths if not unavailable(p)]
  for path in args.paths:
    if unavailable(path):
      _skip(path, unavailable(path), args)
  for top_k in args.top_k:
    dense_ms = None
    for experts in args.experts:
      for path in paths:
        if path == "dense" and dense_ms is not None:
          continue  # One dense baseline per k.
        module, apply = build(path, experts, top_k, args)
        fn, params = _grad_fn(module, apply)
        ms = time_fn(fn, params, x, iters=args.iters)
        # As it is measured, so that a run cut short (time limit, out of memory) still says it.
        print(f"# measured {path} E={experts} k={top_k}: {ms:.3f} ms", file=sys.stderr, flush=True)
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


# --check: float32 at the highest matmul precision (kernels that run float32 exactly), and bfloat16,
# the dtype the table times (a kernel may take another route in float32). Largest |difference| /
# largest |reference| over each output and gradient leaf.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def _output_and_grads(path: str, experts: int, top_k: int, x, args):
  module, apply = build(path, experts, top_k, args)
  graphdef, params = nnx.split(module, nnx.Param)

  def loss(params, x):
    y = apply(nnx.merge(graphdef, params), x).astype(jnp.float32)
    return jnp.mean(jnp.square(y)), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (y, grads))


def _relative_difference(got, want) -> float:
  leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in leaves)


def check_agreement(paths, dtype: str) -> dict[str, float]:
  """On the current device: each path's output and gradients (parameters and input) against the
  einsum path, when nothing drops (C = S). Returns the largest relative difference per path."""
  args = argparse.Namespace(
      d_model=64, hidden=128, activation="gelu", dtype=dtype, capacity_factor=None
  )
  x = jax.random.normal(jax.random.key(1), (4, 128, 64)).astype(dtype)
  worst = {}
  with jax.default_matmul_precision("highest"):
    for top_k in (1, 2):
      want = _output_and_grads("einsum", 8, top_k, x, args)
      for path in paths:
        got = _output_and_grads(path, 8, top_k, x, args)
        worst[path] = max(worst.get(path, 0.0), _relative_difference(got, want))
  return worst


def probe_tokamax() -> list[str]:
  """Which tokamax kernel runs each of the three matmuls here, each alone (bf16, E=8, T=1024): one
  line per (direction, kernel), 'ok' or the exception. Without this, a kernel that refuses a call
  falls back to the next in `moe.kernels.grouped_matmul.tokamax_kernels` silently."""
  if unavailable(DROPLESS + "tokamax"):
    return [f"tokamax: {unavailable(DROPLESS + 'tokamax')}"]
  kx, kw, kd = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (1024, 256), jnp.bfloat16)
  w = jax.random.normal(kw, (8, 256, 512), jnp.bfloat16)
  dy = jax.random.normal(kd, (1024, 512), jnp.bfloat16)
  sizes = jnp.full((8,), 128, jnp.int32)
  lines = []
  for direction in ("forward", "input_grad", "weight_grad"):
    for kernel in ("mosaic", "triton"):
      chosen = {d: ("xla",) for d in ("forward", "input_grad", "weight_grad")} | {
          direction: (kernel,)
      }
      kernels = grouped_matmul.TokamaxKernels(**chosen)
      f = lambda x, w: grouped_matmul.tokamax_grouped_matmul(x, w, sizes, kernels)
      try:
        jax.block_until_ready(jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))(x, w, dy))
        lines.append(f"tokamax {direction:<12}{kernel:<8}ok")
      except Exception as e:  # pylint: disable=broad-exception-caught
        lines.append(f"tokamax {direction:<12}{kernel:<8}{type(e).__name__}: {str(e)[:120]}")
  return lines


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
      help="first check every path's outputs and gradients against the einsum path on this device "
      "(float32 and bfloat16, no drops); exit 1 if one disagrees",
  )
  parser.add_argument("--check_only", action="store_true", help="--check, then exit without timing")
  parser.add_argument(
      "--probe_tokamax",
      action="store_true",
      help="first print which tokamax kernel runs each matmul direction on this device",
  )
  args = parser.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if "dense" not in args.paths:
    args.paths = ["dense"] + list(args.paths)
  if args.tokens % args.seq_len:
    parser.error(f"--tokens={args.tokens} must be a multiple of --seq_len={args.seq_len}")
  out = sys.stderr if args.json else sys.stdout

  if args.probe_tokamax:
    for line in probe_tokamax():
      print(f"# {line}", file=out, flush=True)
  if args.check or args.check_only:
    checked = [p for p in args.paths if p in CHECKED and not unavailable(p)]
    failed = []
    for dtype, tolerance in CHECK_TOLERANCE.items():
      for path, err in check_agreement(checked, dtype).items():
        verdict = "ok" if err <= tolerance else f"DISAGREES (tolerance {tolerance:.0e})"
        print(
            f"# check on {jax.devices()[0].device_kind}, {dtype}: {path} vs einsum, outputs and "
            f"gradients, max relative difference {err:.2e} {verdict}",
            file=out,
            flush=True,
        )
        if err > tolerance:
          failed.append(f"{path} ({dtype})")
    if failed:
      raise SystemExit(f"paths disagree with einsum on this device: {', '.join(failed)}")
    if args.check_only:
      return
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
  print(f"{'path':<18}{'experts':>8}{'top_k':>6}{'ms':>11}{'vs dense':>10}")
  for r in records:
    print(
        f"{r['path']:<18}{r['experts']:>8}{r['top_k']:>6}{r['ms']:>11.2f}"
        f"{r['ratio_vs_dense']:>9.2f}x"
    )


if __name__ == "__main__":
  main()
