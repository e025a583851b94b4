"""Forward + backward time of each MoE dispatch path against a dense FFN of equal active FLOPs.

    python -m benchmarks.moe_layer                         # CPU-sized defaults, a table
    python -m benchmarks.moe_layer --json                  # one JSON record per (path, experts, top_k)
    python -m benchmarks.moe_layer --preset=gpu            # T=16384, d=2048, f=4096, E in {8, 64}, k in {1, 2}, bf16
    python -m benchmarks.moe_layer --check                 # first: every path's outputs and gradients
                                                           # against the einsum path, on this device
    python -m benchmarks.moe_layer --experts=8,64 --top_k=2 --paths=gather,dropless-tokamax

The dense baseline has d_ff = k * f, so at capacity factor 1.0 the experts and the dense FFN do the same
matmul FLOPs; the ratio is the price of routing (router, dispatch, combine, load imbalance). Time is the
median over `--iters` calls of a jitted function returning the gradients with respect to the parameters
and the input. Paths: `dense`, `einsum`, `gather`, and the dropless dispatch with each grouped matmul
(`dropless-<moe.grouped_matmul>`: `dropless-auto`, `-xla`, `-tokamax`); one that is not available on
this backend is skipped with a line saying why. The shape flags left unset come from `--preset`.
Depends on jax, flax and absl only (the GPU image has no tensorflow-datasets or grain); tokamax where
installed.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import benchmarks
from benchmarks.layer_timing import DROPLESS, DTYPES, PATHS, PRESETS, LayerShape, build, grad_fn
from benchmarks.layer_timing import time_fn, unavailable
from moe.config.enums import Activation
from moe.kernels import grouped_matmul

# Compared with the einsum path: one function when nothing drops (C = S).
CHECKED = tuple(p for p in PATHS if p not in ("dense", "einsum"))


class _PositiveIntegers(flags.ListParser):
  """A comma-separated list of positive integers ('8,64')."""

  def parse(self, argument):
    values = super().parse(argument)
    try:
      numbers = [int(v) for v in values]
    except ValueError:
      numbers = []
    if not numbers or min(numbers) < 1:
      raise ValueError(f"{argument!r} is not a comma-separated list of positive integers")
    return numbers

  def flag_type(self):
    return "comma-separated positive integers"


def _define_positive_integers(name: str, help_text: str):
  return flags.DEFINE(
      _PositiveIntegers(), name, None, help_text, serializer=flags.CsvListSerializer(",")
  )


_PRESET = flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Shapes of the unset flags below.")
_TOKENS = flags.DEFINE_integer("tokens", None, "T, tokens per call.", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len", None, "Tokens per sequence (= routing group size).", lower_bound=1
)
_D_MODEL = flags.DEFINE_integer("d_model", None, "Model width d.", lower_bound=1)
_HIDDEN = flags.DEFINE_integer("hidden", None, "f, the hidden width of one expert.", lower_bound=1)
_EXPERTS = _define_positive_integers("experts", "Numbers of experts E, comma-separated.")
_TOP_K = _define_positive_integers("top_k", "Experts per token k, comma-separated.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype.")
_ITERS = flags.DEFINE_integer("iters", None, "Timed calls (the median is reported).", lower_bound=1)
_CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", 1.0, "Capacity factor (> 0) of the einsum and gather paths."
)
flags.register_validator("capacity_factor", lambda cf: cf > 0, message="must be > 0")
_ACTIVATION = flags.DEFINE_enum(
    "activation", "gelu", [a.value for a in Activation], "FFN activation."
)
# A list, not absl's multi_enum: that one takes a repeated flag but refuses "a,b".
_PATHS = flags.DEFINE_list(
    "paths", list(PATHS), f"Paths to time, comma-separated: {', '.join(PATHS)}."
)
flags.register_validator(
    "paths",
    lambda paths: bool(paths) and all(p in PATHS for p in paths),
    message=f"each value must be one of {', '.join(PATHS)}",
)
_JSON = flags.DEFINE_bool("json", False, "One JSON record per line on stdout (the rest on stderr).")
_CHECK = flags.DEFINE_bool(
    "check",
    False,
    "First check every path's outputs and gradients against the einsum path on this device "
    "(float32 and bfloat16, no drops); exit 1 if one disagrees.",
)
_CHECK_ONLY = flags.DEFINE_bool("check_only", False, "--check, then exit without timing.")
_PROBE_TOKAMAX = flags.DEFINE_bool(
    "probe_tokamax", False, "First print which tokamax kernel runs each matmul direction here."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """What one table times: the layer shape, T tokens in sequences of seq_len (each a routing group),
  every (E, k) of `experts` x `top_k` on each path, the median of `iters` calls."""

  shape: LayerShape
  tokens: int
  seq_len: int
  experts: list[int]
  top_k: list[int]
  paths: list[str]
  iters: int


def settings_from_flags() -> Settings:
  """The flags, the unset ones from `--preset`; dense always runs (the ratios' denominator).

  Raises:
    ValueError: --tokens is not a multiple of --seq_len, or a k exceeds an E (one line naming both
      flags).
  """
  preset = PRESETS[_PRESET.value]
  pick = lambda flag, key: preset[key] if flag.value is None else flag.value
  tokens, seq_len = pick(_TOKENS, "tokens"), pick(_SEQ_LEN, "seq_len")
  if tokens % seq_len:
    raise ValueError(f"--tokens={tokens} must be a multiple of --seq_len={seq_len}")
  shape = LayerShape(
      d_model=pick(_D_MODEL, "d_model"),
      hidden=pick(_HIDDEN, "hidden"),
      activation=_ACTIVATION.value,
      dtype=pick(_DTYPE, "dtype"),
      capacity_factor=_CAPACITY_FACTOR.value,
  )
  experts, top_k = list(pick(_EXPERTS, "experts")), list(pick(_TOP_K, "top_k"))
  if max(top_k) > min(experts):
    raise ValueError(f"--top_k={max(top_k)} must be at most --experts={min(experts)}")
  paths = list(_PATHS.value)
  return Settings(
      shape=shape,
      tokens=tokens,
      seq_len=seq_len,
      experts=experts,
      top_k=top_k,
      paths=paths if "dense" in paths else ["dense"] + paths,
      iters=pick(_ITERS, "iters"),
  )


def _skip(path: str, reason: str, log) -> None:
  print(f"# skipped {path}: {reason}", file=log, flush=True)


def run(settings: Settings, log=sys.stdout) -> list[dict]:
  """Times every (k, E, path) of `settings` (dense once per k); returns one record each, with the
  ratio to the dense FFN of the same k. Skipped paths and each measurement are logged as they come.
  """
  records = []
  batch = settings.tokens // settings.seq_len
  x = jax.random.normal(
      jax.random.key(0),
      (batch, settings.seq_len, settings.shape.d_model),
      DTYPES[settings.shape.dtype],
  )
  paths = [p for p in settings.paths if not unavailable(p)]
  for path in settings.paths:
    if unavailable(path):
      _skip(path, unavailable(path), log)
  for top_k in settings.top_k:
    dense_ms = None
    for experts in settings.experts:
      for path in paths:
        if path == "dense" and dense_ms is not None:
          continue  # One dense baseline per k.
        module, apply = build(path, experts, top_k, settings.shape)
        fn, params = grad_fn(module, apply)
        ms = time_fn(fn, params, x, iters=settings.iters)
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


def _output_and_grads(path: str, experts: int, top_k: int, x, shape: LayerShape):
  module, apply = build(path, experts, top_k, shape)
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
  shape = LayerShape(d_model=64, hidden=128, activation="gelu", dtype=dtype, capacity_factor=None)
  x = jax.random.normal(jax.random.key(1), (4, 128, 64)).astype(dtype)
  worst = {}
  with jax.default_matmul_precision("highest"):
    for top_k in (1, 2):
      want = _output_and_grads("einsum", 8, top_k, x, shape)
      for path in paths:
        got = _output_and_grads(path, 8, top_k, x, shape)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    settings = settings_from_flags()  # Refused before anything compiles.
  except ValueError as error:
    sys.exit(f"benchmarks.moe_layer: {error}")
  # With --json, stdout holds the records alone.
  out = sys.stderr if _JSON.value else sys.stdout

  if _PROBE_TOKAMAX.value:
    for line in probe_tokamax():
      print(f"# {line}", file=out, flush=True)
  if _CHECK.value or _CHECK_ONLY.value:
    checked = [p for p in settings.paths if p in CHECKED and not unavailable(p)]
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
      sys.exit(f"paths disagree with einsum on this device: {', '.join(failed)}")
    if _CHECK_ONLY.value:
      return 0
  records = run(settings, log=out)
  if _JSON.value:
    for r in records:
      print(json.dumps(r))
    return 0
  device, shape = jax.devices()[0], settings.shape
  print(
      f"# {device.platform} {device.device_kind}; T={settings.tokens} (groups of "
      f"{settings.seq_len}), d={shape.d_model}, f={shape.hidden}, {shape.dtype}, "
      f"cf={shape.capacity_factor}, forward+backward, median of {settings.iters}"
  )
  print(f"{'path':<18}{'experts':>8}{'top_k':>6}{'ms':>11}{'vs dense':>10}")
  for r in records:
    print(
        f"{r['path']:<18}{r['experts']:>8}{r['top_k']:>6}{r['ms']:>11.2f}"
        f"{r['ratio_vs_dense']:>9.2f}x"
    )
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=benchmarks.flags_parser("benchmarks.moe_layer"))
