"""A grouped matmul in Pallas: y[t] = x[t] @ w[group of row t], with a custom VJP of two kernels.

Rows of x are sorted by group: group e owns rows [offsets[e], offsets[e + 1]), with offsets the
cumulative group sizes, and rows at or past sum(group_sizes) give zeros (as `jax.lax.ragged_dot`).

Design (megablocks, Gale et al. 2022, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts";
jax `pallas/ops/tpu/megablox`): the row axis is cut into fixed tiles, and metadata computed outside the
kernel from the group sizes tells each tile which groups it intersects (a tile that straddles a group
boundary is computed once per group, with the rows of other groups masked out). megablox runs on a
TPU's sequential grid and revisits one output tile once per group, accumulating in place; a GPU grid
is parallel, so here each program owns one output tile and loops over its groups itself, and the
kernels use only BlockSpecs, `pl.program_id`, loops and dots: they lower with Triton on GPU and run in
interpret mode on the CPU (how the tests check them).

  * `_gmm`: y [T, N] = x [T, K] @ w[g] [K, N] per row group (forward), or @ w[g]^T with w [E, N, K]
    (the input gradient: dx = dy @ w[g]^T, the same kernel on the stored weights, no transpose copy).
  * `_tgmm`: dw[g] = x_g^T @ dy_g [K, N], the "transposed grouped matmul" of the weight gradient: one
    program per (group, K tile, N tile) walks the row tiles of its group.

Every tile size is a power of two (Triton's loads and dots need it); arrays are zero-padded to whole
tiles outside the kernels when their sizes are not multiples (never at the benchmark's sizes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

# tl.dot needs every dimension of a tile to be at least 16.
_MIN_TILE = 16


@dataclasses.dataclass(frozen=True)
class TileSizes:
  """Tile sizes of the kernels, powers of two >= 16: rows (m), contraction (k), output columns (n).

  A tile larger than its (padded) dimension is shrunk to it, so small problems need no large tiles.
  """

  m: int = 128
  k: int = 64
  n: int = 128

  def __post_init__(self):
    for name in ("m", "k", "n"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= _MIN_TILE and value & (value - 1) == 0):
        raise ValueError(f"TileSizes.{name}={value!r} must be a power of two >= {_MIN_TILE}")


def _fit(tile: int, size: int) -> int:
  """The tile for a dimension of `size`: no larger than the smallest power of two >= size."""
  return min(tile, max(_MIN_TILE, pl.next_power_of_2(size)))


def _pad_axis(a: jax.Array, axis: int, multiple: int) -> jax.Array:
  extra = -a.shape[axis] % multiple
  if not extra:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def group_offsets(group_sizes_E: jax.Array) -> jax.Array:
  """[E + 1] int32: group e owns rows [offsets[e], offsets[e + 1])."""
  ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
  return jnp.concatenate([jnp.zeros(1, jnp.int32), ends_E])


def tile_group_range(offsets_E1: jax.Array, num_tiles: int, tile_m: int):
  """First and last group that row tile i intersects ([num_tiles] int32 each).

  Row r belongs to the group e with offsets[e] <= r < offsets[e + 1]: the number of group ends <= r.
  Empty groups own no row and are skipped. A tile at or past sum(group_sizes) gets last < first (no
  group): its clamped last row, sum - 1, lies before the group end that its first row has passed.
  """
  ends_E = offsets_E1[1:]
  tile_starts = jnp.arange(num_tiles, dtype=jnp.int32) * tile_m
  last_rows_M = jnp.minimum(tile_starts + tile_m, ends_E[-1]) - 1
  first_expert = jnp.searchsorted(ends_E, tile_starts, side="right").astype(jnp.int32)
  last_expert = jnp.searchsorted(ends_E, last_rows_M, side="right").astype(jnp.int32)
  return first_expert, last_expert


def _compiler_params(interpret: bool, tile_m: int, tile_n: int):
  """Triton launch parameters (untuned: 8 warps for a 128 x 128 accumulator, as Triton's matmul
  tutorial); none in interpret mode."""
  if interpret:
    return None
  return pl_triton.CompilerParams(num_warps=8 if tile_m * tile_n >= 128 * 128 else 4, num_stages=3)


def _gmm_kernel(
    first_ref, last_ref, offsets_ref, x_ref, w_ref, out_ref, *, tile_k, num_k, transpose_rhs
):
  """One [tile_m, tile_n] output tile: sum over its groups g of mask_g(x tile) @ w[g] tile."""
  i = pl.program_id(0)
  tile_m = x_ref.shape[0]
  rows = i * tile_m + jax.lax.broadcasted_iota(jnp.int32, (tile_m, 1), 0)
  # Contract x's columns with w's rows ([K, N] weights) or with w's columns ([N, K] weights).
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

  def one_group(g, acc):
    in_group = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])

    def one_k_tile(kk, acc):
      cols = pl.ds(kk * tile_k, tile_k)
      x = x_ref[:, cols]
      x = jnp.where(in_group, x, jnp.zeros_like(x))
      w = w_ref[g, :, cols] if transpose_rhs else w_ref[g, cols, :]
      return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, num_k, one_k_tile, acc)

  acc = jnp.zeros(out_ref.shape, jnp.float32)
  acc = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, one_group, acc)
  out_ref[...] = acc.astype(out_ref.dtype)


def _gmm(x_TI, w, offsets_E1, tiles: TileSizes, transpose_rhs: bool, interpret: bool):
  """y [T, N] = x[t] @ w[g(t)] with w [E, K, N], or x[t] @ w[g(t)]^T with w [E, N, K]."""
  t, k = x_TI.shape
  e = w.shape[0]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  tm, tk, tn = _fit(tiles.m, t), _fit(tiles.k, k), _fit(tiles.n, n)
  x_TI = _pad_axis(_pad_axis(x_TI, 0, tm), 1, tk)
  k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
  w = _pad_axis(_pad_axis(w, k_axis, tk), n_axis, tn)
  tp, kp = x_TI.shape
  np_ = w.shape[n_axis]
  num_m = tp // tm
  first_expert, last_expert = tile_group_range(offsets_E1, num_m, tm)
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
  # Every group's weights for output columns j; the kernel reads the groups its row tile needs.
  w_block = (e, tn, kp) if transpose_rhs else (e, kp, tn)
  w_index = (lambda i, j: (0, j, 0)) if transpose_rhs else (lambda i, j: (0, 0, j))
  y = pl.pallas_call(
      functools.partial(_gmm_kernel, tile_k=tk, num_k=kp // tk, transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((tp, np_), jnp.result_type(x_TI, w)),
      grid=(num_m, np_ // tn),
      in_specs=[
          whole(first_expert),
          whole(last_expert),
          whole(offsets_E1),
          pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
          pl.BlockSpec(w_block, w_index),
      ],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret, tm, tn),
      name="grouped_matmul",
  )(first_expert, last_expert, offsets_E1, x_TI, w)
  return y[:t, :n]


def _tgmm_kernel(offsets_ref, x_ref, dy_ref, out_ref, *, tile_m):
  """dw[g] tile [tile_k, tile_n] = sum over the row tiles of group g of x_tile^T @ dy_tile."""
  g = pl.program_id(0)
  lo, hi = offsets_ref[g], offsets_ref[g + 1]
  first_tile = lo // tile_m
  end_tile = jnp.where(hi > lo, (hi + tile_m - 1) // tile_m, first_tile)

  def one_row_tile(i, acc):
    rows = i * tile_m + jax.lax.broadcasted_iota(jnp.int32, (tile_m, 1), 0)
    in_group = (rows >= lo) & (rows < hi)
    x = x_ref[pl.ds(i * tile_m, tile_m), :]
    dy = dy_ref[pl.ds(i * tile_m, tile_m), :]
    # Both masked: a non-finite row of another group must not reach this group's gradient.
    x = jnp.where(in_group, x, jnp.zeros_like(x))
    dy = jnp.where(in_group, dy, jnp.zeros_like(dy))
    dims = (((0,), (0,)), ((), ()))
    return acc + jax.lax.dot_general(x, dy, dims, preferred_element_type=jnp.float32)

  acc = jnp.zeros(out_ref.shape, jnp.float32)
  out_ref[...] = jax.lax.fori_loop(first_tile, end_tile, one_row_tile, acc).astype(out_ref.dtype)


def _tgmm(x_TI, dy_TO, offsets_E1, tiles: TileSizes, out_dtype, interpret: bool):
  """dw [E, K, N]: dw[g] = x[rows of g]^T @ dy[rows of g]; zero for an empty group."""
  (t, k), n = x_TI.shape, dy_TO.shape[1]
  e = offsets_E1.shape[0] - 1
  tm, tk, tn = _fit(tiles.m, t), _fit(tiles.k, k), _fit(tiles.n, n)
  x_TI = _pad_axis(_pad_axis(x_TI, 0, tm), 1, tk)
  dy_TO = _pad_axis(_pad_axis(dy_TO, 0, tm), 1, tn)
  tp, kp = x_TI.shape
  np_ = dy_TO.shape[1]
  dw = pl.pallas_call(
      functools.partial(_tgmm_kernel, tile_m=tm),
      out_shape=jax.ShapeDtypeStruct((e, kp, np_), out_dtype),
      grid=(e, kp // tk, np_ // tn),
      in_specs=[
          pl.BlockSpec(offsets_E1.shape, lambda g, kk, j: (0,)),
          pl.BlockSpec((tp, tk), lambda g, kk, j: (0, kk)),
          pl.BlockSpec((tp, tn), lambda g, kk, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, kk, j: (g, kk, j)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret, tk, tn),
      name="transposed_grouped_matmul",
  )(offsets_E1, x_TI, dy_TO)
  return dw[:, :k, :n]


def _default_interpret() -> bool:
  return jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul(x_TI, w_EIO, group_sizes_E, tiles: TileSizes = TileSizes(), interpret=None):
  """y [T, N] with y[t] = x[t] @ w[e] for the group e of row t; zero past sum(group_sizes).

  Args:
    x_TI: rows sorted by group, [T, K].
    w_EIO: one [K, N] matrix per group, [E, K, N].
    group_sizes_E: rows per group, [E] integers summing to at most T.
    tiles: kernel tile sizes (`TileSizes`).
    interpret: run the kernels in Pallas interpret mode; None: on the CPU only.

  The VJP is two more kernels: dx = dy @ w[g]^T (`_gmm` on the stored weights) and
  dw[g] = x_g^T dy_g (`_tgmm`).
  """
  y, _ = _forward(x_TI, w_EIO, group_sizes_E, tiles, interpret)
  return y


def _forward(x_TI, w_EIO, group_sizes_E, tiles, interpret):
  interpret = _default_interpret() if interpret is None else interpret
  offsets_E1 = group_offsets(group_sizes_E)
  y = _gmm(x_TI, w_EIO, offsets_E1, tiles, transpose_rhs=False, interpret=interpret)
  return y, (x_TI, w_EIO, offsets_E1)


def _backward(tiles, interpret, residuals, dy_TO):
  interpret = _default_interpret() if interpret is None else interpret
  x_TI, w_EIO, offsets_E1 = residuals
  dy_TO = dy_TO.astype(jnp.result_type(x_TI, w_EIO))
  dx = _gmm(dy_TO, w_EIO, offsets_E1, tiles, transpose_rhs=True, interpret=interpret)
  dw = _tgmm(x_TI, dy_TO, offsets_E1, tiles, w_EIO.dtype, interpret)
  return dx.astype(x_TI.dtype), dw, None  # Integer group sizes have no cotangent.


grouped_matmul.defvjp(_forward, _backward)
