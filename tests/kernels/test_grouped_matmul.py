"""moe/kernels/grouped_matmul.py and its Pallas kernels (moe/kernels/pallas_grouped_matmul.py) against a float64 loop.

Every implementation must equal `jax.lax.ragged_dot`'s definition, written here as a per-group numpy
loop: outputs and both gradients, with empty groups, groups longer than a tile, a row count that is
not a multiple of the tile and rows past sum(group_sizes). Pallas runs in interpret mode on the CPU;
tokamax through its XLA implementation (skipped where tokamax is not installed: it is in the `gpu`
extra, not the `test` one, for its many dependencies).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config.enums import Activation, GroupedMatmul
from moe.config.layer import MoEConfig
from moe.kernels import grouped_matmul as gm, pallas_grouped_matmul
from moe.layers import dispatch
from moe.layers.ffn import Experts

T, D, F, E = 50, 24, 20, 4
SMALL_TILES = pallas_grouped_matmul.TileSizes(m=16, k=16, n=16)
GROUP_SIZES = {
    # An empty group, a group spanning three 16-row tiles, 5 rows past the groups, T % 16 != 0.
    "uneven": [5, 0, 30, 10],
    "one_group": [0, 0, 50, 0],
    "no_rows": [0, 0, 0, 0],
    "every_row": [17, 16, 1, 16],
}
needs_tokamax = pytest.mark.skipif(gm._tokamax() is None, reason="tokamax is not installed")
IMPLEMENTATIONS = [
    pytest.param("xla"),
    pytest.param("tokamax", marks=needs_tokamax),
    pytest.param("pallas"),
    pytest.param("pallas_small_tiles"),
]


def reference(x_TD, w_EDF, group_sizes, dy_TF):
  """float64 y, dx, dw of y = ragged_dot(x, w, group_sizes) for the cotangent dy, group by group."""
  x, w, dy = (np.asarray(a, np.float64) for a in (x_TD, w_EDF, dy_TF))
  y, dx, dw = np.zeros(dy.shape), np.zeros(x.shape), np.zeros(w.shape)
  start = 0
  for e, size in enumerate(group_sizes):
    rows = slice(start, start + size)
    y[rows] = x[rows] @ w[e]
    dx[rows] = dy[rows] @ w[e].T
    dw[e] = x[rows].T @ dy[rows]
    start += size
  return y, dx, dw  # Rows past the last group: zero output, zero gradient.


def _run(name: str, x, w, group_sizes_E):
  if name == "pallas_small_tiles":
    return pallas_grouped_matmul.grouped_matmul(x, w, group_sizes_E, SMALL_TILES)
  return gm.grouped_matmul(x, w, group_sizes_E, name)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(GROUP_SIZES))
def test_outputs_and_gradients_equal_the_per_group_reference(name, case):
  kx, kw, kdy = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (T, D))
  w = jax.random.normal(kw, (E, D, F))
  dy = jax.random.normal(kdy, (T, F))
  group_sizes = GROUP_SIZES[case]
  y, vjp = jax.vjp(lambda x, w: _run(name, x, w, jnp.array(group_sizes, jnp.int32)), x, w)
  dx, dw = vjp(dy)
  for got, want in zip((y, dx, dw), reference(x, w, group_sizes, dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_tiles_know_their_groups():
  """Row tile i is computed for exactly the groups that own one of its rows (empty groups skipped)."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    sizes = rng.integers(0, 12, size=6) * rng.integers(0, 2, size=6)
    tile, num_rows = 8, int(sizes.sum()) + int(rng.integers(0, 9))
    num_tiles = -(-num_rows // tile)
    offsets = pallas_grouped_matmul.group_offsets(jnp.asarray(sizes))
    first, last = pallas_grouped_matmul.tile_group_range(offsets, num_tiles, tile)
    owner = np.repeat(np.arange(6), sizes)  # The group of each row that has one.
    for i in range(num_tiles):
      groups = set(owner[i * tile : (i + 1) * tile].tolist())
      if groups:
        assert (int(first[i]), int(last[i])) == (min(groups), max(groups))
      else:
        assert int(last[i]) < int(first[i])


def test_pallas_kernels_lower_with_triton():
  """The forward and both backward kernels lower for an NVIDIA GPU (abstract device: none needed)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device
  )
  loss = lambda x, w, g: jnp.sum(pallas_grouped_matmul.grouped_matmul(x, w, g, interpret=False))
  shapes = [((256, 128), jnp.bfloat16), ((8, 128, 256), jnp.bfloat16), ((8,), jnp.int32)]
  with jax.sharding.use_abstract_mesh(mesh):
    traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
        *(jax.ShapeDtypeStruct(s, d) for s, d in shapes)
    )
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
  kernels = re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "(\w+)"', text)
  assert sorted(kernels) == ["grouped_matmul", "grouped_matmul", "transposed_grouped_matmul"]


@pytest.mark.parametrize("name", ["tokamax", "pallas"])
@pytest.mark.parametrize("activation", list(Activation))
def test_dropless_experts_equal_the_xla_path(name, activation):
  """Dropless dispatch (sort, grouped experts, un-permute, gates) with each kernel: the same outputs
  and gradients (input, gates, every expert weight) as with jax.lax.ragged_dot."""
  if name == "tokamax" and gm._tokamax() is None:
    pytest.skip("tokamax is not installed")
  k = 2
  kx, ke, kg, kc = jax.random.split(jax.random.key(1), 4)
  x_GSD = jax.random.normal(kx, (2, 8, D))
  expert_GSK = jax.random.randint(ke, (2, 8, k), 0, E - 1)  # Expert E - 1 gets nothing.
  gates_GSK = jax.random.uniform(kg, (2, 8, k))
  cotangent = jax.random.normal(kc, (2, 8, D))

  def value_and_grads(implementation):
    with nnx.use_eager_sharding(False):
      experts = Experts(E, D, F, activation, grouped_matmul=implementation, rngs=nnx.Rngs(0))

    def loss(experts, x, gates):
      y, _ = dispatch.dropless_moe(x, expert_GSK, gates, experts.grouped, E)
      return jnp.sum(y * cotangent)

    return nnx.value_and_grad(loss, argnums=(0, 1, 2))(experts, x_GSD, gates_GSK)

  want, got = value_and_grads("xla"), value_and_grads(name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_auto_picks_by_backend(monkeypatch):
  assert gm.resolve("auto", "cpu") is GroupedMatmul.XLA
  assert gm.resolve("auto", "tpu") is GroupedMatmul.XLA
  monkeypatch.setattr(gm, "_tokamax", lambda: object())
  assert gm.resolve("auto", "gpu") is GroupedMatmul.TOKAMAX
  monkeypatch.setattr(gm, "_tokamax", lambda: None)
  assert gm.resolve("auto", "gpu") is GroupedMatmul.PALLAS


def _one_line_error(fn, match: str):
  with pytest.raises(ValueError, match=match) as error:
    fn()
  assert "\n" not in str(error.value)


def test_an_unavailable_kernel_is_one_clear_error_when_the_experts_are_built(monkeypatch):
  missing = (None, "ModuleNotFoundError: No module named 'tokamax'")
  monkeypatch.setattr(gm, "_import_tokamax", lambda: missing)
  message = (
      r"^moe\.grouped_matmul='tokamax' is not available on cpu: tokamax does not import "
      r"\(ModuleNotFoundError: No module named 'tokamax'; pip install tokamax, the `gpu` extra\); "
      r"available: 'auto', 'xla', 'pallas'$"
  )
  build = lambda: Experts(E, D, F, Activation.GELU, grouped_matmul="tokamax", rngs=nnx.Rngs(0))
  _one_line_error(build, message)
  _one_line_error(
      lambda: gm.resolve("pallas", "tpu"),
      r"^moe\.grouped_matmul='pallas' is not available on tpu: .*; available: 'auto', 'xla'$",
  )


def test_the_config_field_is_an_enum():
  cfg = MoEConfig(num_experts=4, expert_hidden=8, grouped_matmul="Pallas")
  assert cfg.grouped_matmul is GroupedMatmul.PALLAS
  assert MoEConfig(num_experts=4, expert_hidden=8).grouped_matmul is GroupedMatmul.AUTO
  _one_line_error(
      lambda: MoEConfig(num_experts=4, expert_hidden=8, grouped_matmul="cutlass"),
      r"^moe\.grouped_matmul='cutlass' is not one of 'auto', 'xla', 'tokamax', 'pallas'$",
  )


def _plain_dropless(x_GSD, expert_GSK, gates_GSK, grouped_fn, num_experts):
  """dropless_moe as autodiff sees it without custom VJPs: a gather in, a scatter out."""
  g, s, d = x_GSD.shape
  k = expert_GSK.shape[-1]
  expert_J = expert_GSK.reshape(-1)
  perm_J = jnp.argsort(expert_J, stable=True)
  x_sorted = x_GSD.reshape(g * s, d)[perm_J // k]
  sizes_E = jnp.bincount(expert_J, length=num_experts).astype(jnp.int32)
  y_sorted = grouped_fn(x_sorted, sizes_E)
  y_JD = jnp.zeros_like(y_sorted).at[perm_J].set(y_sorted)
  return jnp.einsum("gsk,gskd->gsd", gates_GSK, y_JD.reshape(g, s, k, d))


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_permutation_vjp_equals_autodiff_of_the_plain_version(k):
  """sort_claims / unsort_claims (gathers both ways) give autodiff's gradients of gather + scatter."""
  kx, ke, kg, kw, kc = jax.random.split(jax.random.key(2), 5)
  x_GSD = jax.random.normal(kx, (2, 6, D))
  expert_GSK = jax.random.randint(ke, (2, 6, k), 0, E)
  gates_GSK = jax.random.uniform(kg, (2, 6, k))
  w_EDD = jax.random.normal(kw, (E, D, D))
  cotangent = jax.random.normal(kc, (2, 6, D))

  def grads(run):
    def loss(x, gates, w):
      grouped = lambda rows, sizes: jax.lax.ragged_dot(rows, w, sizes)
      y = run(x, expert_GSK, gates, grouped, E)
      return jnp.sum((y[0] if isinstance(y, tuple) else y) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x_GSD, gates_GSK, w_EDD)

  want, got = grads(_plain_dropless), grads(dispatch.dropless_moe)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("implementation", ("xla", "pallas"))
def test_the_layer_runs_the_configured_kernel(implementation, monkeypatch):
  """moe.grouped_matmul reaches the experts of a dropless MoEFeedForward (not just the default)."""
  from moe.layers import ffn  # pylint: disable=g-import-not-at-top
  from moe.layers.moe_layer import MoEFeedForward  # pylint: disable=g-import-not-at-top

  cfg = MoEConfig(
      num_experts=4,
      top_k=2,
      expert_hidden=16,
      dispatch="dropless",
      grouped_matmul=implementation,
      train_capacity_factor=None,
      eval_capacity_factor=None,
  )
  with nnx.use_eager_sharding(False):
    layer = MoEFeedForward(cfg, 8, rngs=nnx.Rngs(0))
  seen = []
  monkeypatch.setattr(
      ffn,
      "grouped_matmul",
      lambda x, w, sizes, impl: seen.append(impl) or gm.grouped_matmul(x, w, sizes, impl),
  )
  layer(jnp.ones((2, 4, 8), jnp.float32))
  assert seen and {GroupedMatmul(i) for i in seen} == {GroupedMatmul(implementation)}
