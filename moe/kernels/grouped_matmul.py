"""The grouped matmul of the DROPLESS dispatch, one function over the choices of `GroupedMatmul`.

    y_TF = grouped_matmul(x_TD, w_EDF, group_sizes_E, GroupedMatmul.PALLAS)

Every choice computes `jax.lax.ragged_dot(x, w, group_sizes)`: rows sorted by group, group e owning
the next group_sizes[e] rows, y[t] = x[t] @ w[e]; rows at or past sum(group_sizes) give zeros. They
differ in speed and in where they run:

  * XLA: `jax.lax.ragged_dot`, the portable reference. On GPU, XLA lowers it as a dense dot over
    every expert (7x-63x a dense FFN on an H200, benchmarks/results/moe_layer_h200.txt).
  * TOKAMAX: `tokamax.ragged_dot` (openxla/tokamax, the `gpu` extra), with a kernel chosen for each
    of the three matmuls (`TokamaxKernels`): its Mosaic-GPU kernel is reported slow for the weight
    gradient and its Triton one fast there. On the CPU only its XLA implementation runs.
  * PALLAS: our kernels (`moe.kernels.pallas_grouped_matmul`): Triton on GPU, interpret mode on the CPU
    (correct but slow: for tests).
  * AUTO: TOKAMAX on GPU when it imports, else PALLAS; XLA on CPU and TPU.

A choice that is not available on the backend is refused by `resolve` in one line, before anything is
traced (`moe.layers.ffn.Experts` resolves its choice when it is built).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moe.config.enums import GroupedMatmul
from moe.config.validation import as_enum
from moe.kernels import pallas_grouped_matmul

FIELD = "moe.grouped_matmul"

# jax.lax ragged-dot dimension numbers of the two backward matmuls (the ones tokamax's own VJP uses):
# dx [T, D] = dy [T, F] . w [E, D, F] over F, ragged rows, grouped w; dw [E, D, F] = x [T, D] . dy
# [T, F] over the ragged rows, one output per group.
_TRANSPOSED_RHS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
_RAGGED_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
)


@functools.cache
def _import_tokamax():
  """(the tokamax module, None), or (None, why it does not import): it is an optional dependency."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Not installed, or a dependency that fails as it loads (e.g. a jax_triton built for another
    # jax): either way the choice is unavailable, and the error says why.
    return None, f"{type(e).__name__}: {e}".splitlines()[0]
  return tokamax, None


def _tokamax():
  return _import_tokamax()[0]


@functools.cache
def _has_triton() -> bool:
  """tokamax registers its Triton kernels only when jax_triton and triton import."""
  try:
    import jax_triton, triton  # pylint: disable=import-outside-toplevel,unused-import,multiple-imports
  except Exception:  # pylint: disable=broad-exception-caught
    return False
  return True


def _unavailable_reason(choice: GroupedMatmul, backend: str) -> str | None:
  if choice is GroupedMatmul.TOKAMAX and _tokamax() is None:
    return f"tokamax does not import ({_import_tokamax()[1]}; pip install tokamax, the `gpu` extra)"
  if choice is GroupedMatmul.PALLAS and backend not in ("gpu", "cpu"):
    return "its kernels lower with Triton (GPU) or run in interpret mode (CPU) only"
  return None


def available(backend: str | None = None) -> tuple[GroupedMatmul, ...]:
  """The choices that run on `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  return tuple(c for c in GroupedMatmul if _unavailable_reason(c, backend) is None)


def resolve(choice: GroupedMatmul | str, backend: str | None = None) -> GroupedMatmul:
  """The implementation `choice` runs on `backend`: AUTO made concrete, an unavailable one refused.

  Raises:
    ValueError: one line naming `moe.grouped_matmul`, the value, why, and the available values.
  """
  choice = as_enum(GroupedMatmul, choice, FIELD)
  backend = backend or jax.default_backend()
  if choice is GroupedMatmul.AUTO:
    if backend != "gpu":
      return GroupedMatmul.XLA
    return GroupedMatmul.TOKAMAX if _tokamax() is not None else GroupedMatmul.PALLAS
  reason = _unavailable_reason(choice, backend)
  if reason is not None:
    allowed = ", ".join(repr(c.value) for c in available(backend))
    raise ValueError(
        f"{FIELD}={choice.value!r} is not available on {backend}: {reason}; available: {allowed}"
    )
  return choice


@dataclasses.dataclass(frozen=True)
class TokamaxKernels:
  """tokamax.ragged_dot implementations for each matmul, in order of preference: tokamax runs the
  first that supports the call (the others raise NotImplementedError) and "xla" always does."""

  forward: tuple[str, ...]  # y = x @ w[g]
  input_grad: tuple[str, ...]  # dx = dy @ w[g]^T
  weight_grad: tuple[str, ...]  # dw[g] = x_g^T dy_g


def tokamax_kernels(backend: str) -> TokamaxKernels:
  """The kernels for `backend`. NVIDIA GPU: Mosaic-GPU first for y and dx, Triton first for dw
  (reported faster there; Triton needs jax_triton). TPU: Mosaic-TPU. CPU: tokamax's XLA one."""
  if backend == "gpu":
    triton = ("triton",) if _has_triton() else ()
    # tokamax's "mosaic" means Mosaic-GPU on NVIDIA devices only.
    mosaic = ("mosaic",) if "NVIDIA" in jax.devices()[0].device_kind else ()
    return TokamaxKernels(
        forward=(*mosaic, *triton, "xla"),
        input_grad=(*mosaic, *triton, "xla"),
        weight_grad=(*triton, *mosaic, "xla"),
    )
  if backend == "tpu":
    return TokamaxKernels(("mosaic", "xla"), ("mosaic", "xla"), ("mosaic", "xla"))
  return TokamaxKernels(("xla",), ("xla",), ("xla",))


def _zero_rows_past_groups(y_TF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  # ragged_dot's rows past sum(group_sizes) are zero; a kernel may leave them unwritten (tokamax has
  # a `zero_initialize` option for one of its kernels). XLA fuses this select into the consumer.
  rows_T1 = jax.lax.broadcasted_iota(jnp.int32, (y_TF.shape[0], 1), 0)
  return jnp.where(rows_T1 < jnp.sum(group_sizes_E), y_TF, jnp.zeros_like(y_TF))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tokamax_grouped_matmul(x_TD, w_EDF, group_sizes_E, kernels: TokamaxKernels):
  """`grouped_matmul` through tokamax, each of the three matmuls with its own `kernels` preference."""
  return _tokamax_forward(x_TD, w_EDF, group_sizes_E, kernels)[0]


def _tokamax_forward(x_TD, w_EDF, group_sizes_E, kernels):
  y_TF = _tokamax().ragged_dot(x_TD, w_EDF, group_sizes_E, implementation=kernels.forward)
  return _zero_rows_past_groups(y_TF, group_sizes_E), (x_TD, w_EDF, group_sizes_E)


def _tokamax_backward(kernels, residuals, dy_TF):
  x_TD, w_EDF, group_sizes_E = residuals
  ragged_dot_general = _tokamax().ragged_dot_general
  dy_TF = dy_TF.astype(jnp.result_type(x_TD, w_EDF))
  dx_TD = ragged_dot_general(
      dy_TF,
      w_EDF,
      group_sizes_E,
      _TRANSPOSED_RHS,
      preferred_element_type=x_TD.dtype,
      implementation=kernels.input_grad,
  )
  dw_EDF = ragged_dot_general(
      x_TD,
      dy_TF,
      group_sizes_E,
      _RAGGED_CONTRACTION,
      preferred_element_type=w_EDF.dtype,
      implementation=kernels.weight_grad,
  )
  return _zero_rows_past_groups(dx_TD, group_sizes_E), dw_EDF, None


tokamax_grouped_matmul.defvjp(_tokamax_forward, _tokamax_backward)


def grouped_matmul(
    x_TD: jax.Array,
    w_EDF: jax.Array,
    group_sizes_E: jax.Array,
    implementation: GroupedMatmul | str = GroupedMatmul.AUTO,
) -> jax.Array:
  """y [T, F] = `jax.lax.ragged_dot(x, w, group_sizes)`, computed by `implementation`.

  Args:
    x_TD: rows sorted by group, [T, D].
    w_EDF: one [D, F] matrix per group, [E, D, F].
    group_sizes_E: rows per group, [E] integers summing to at most T.
    implementation: a `GroupedMatmul` (or its string value); AUTO picks by backend (see `resolve`).

  Returns:
    [T, F] in the result type of x and w; rows past sum(group_sizes) are zero. Differentiable in x
    and w.
  """
  backend = jax.default_backend()
  implementation = resolve(implementation, backend)
  if implementation is GroupedMatmul.XLA:
    return jax.lax.ragged_dot(x_TD, w_EDF, group_sizes_E)
  if implementation is GroupedMatmul.TOKAMAX:
    return tokamax_grouped_matmul(x_TD, w_EDF, group_sizes_E, tokamax_kernels(backend))
  return pallas_grouped_matmul.grouped_matmul(x_TD, w_EDF, group_sizes_E)
