"""Dropless MoE under expert parallelism (moe/layers/expert_parallel.py) on 8 fake CPU devices: the same
outputs, losses and gradients as the one-device dropless path, and expert weights that never move (the
compiled HLO has all-to-alls and no all-gather of an expert weight)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_reference as ref
from moe.config.experiment import ExperimentConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig
from moe.data import DataConfig
from moe.layers import expert_parallel
from moe.layers.moe_layer import MoEFeedForward
from moe.parallel import sharding
from moe.trainer import steps

E, D, F = 8, 16, 24  # Distinct sizes, so an expert weight's shape [E, d, f] is unambiguous in HLO.
MESHES = {
    "expert8": sharding.MeshConfig(data=1, expert=8, rules="expert"),
    "data2_expert4": sharding.MeshConfig(data=2, expert=4, rules="expert"),
    "fsdp2_expert2_tensor2": sharding.MeshConfig(
        data=1, fsdp=2, expert=2, tensor=2, rules="expert_tensor"
    ),
}
# Meshes without an expert split: each device sorts and computes its own claims (no all-to-all).
UNSPLIT_MESHES = {
    "data8": sharding.MeshConfig(data=8),
    "fsdp8": sharding.MeshConfig(data=1, fsdp=8, rules="fsdp"),
    # Rules that name 'expert' (the default of configs/builders.py), on a mesh where it has size 1.
    "data8_expert_rules": sharding.MeshConfig(data=8, rules="expert"),
    "data4_tensor2": sharding.MeshConfig(data=4, tensor=2, rules="expert_tensor"),
}


def moe_cfg(**kw) -> MoEConfig:
  base = dict(
      num_experts=E,
      top_k=2,
      expert_hidden=F,
      dispatch="dropless",
      train_capacity_factor=None,
      eval_capacity_factor=None,
  )
  return MoEConfig(**{**base, **kw})


def one_device_layer(cfg: MoEConfig) -> MoEFeedForward:
  with nnx.use_eager_sharding(False):
    layer = MoEFeedForward(cfg, D, rngs=nnx.Rngs(0))
  layer.router.w[...] = layer.router.w[...] * 5.0  # Uneven routing: experts get different counts.
  return layer


def tokens(b=16, l=4, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)


def loss_and_grads(graphdef, params, x):
  """Output, losses, stats and the gradients of a loss that weighs every output and aux loss, with
  respect to the input and every parameter."""

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x, train=True)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * weights) + aux.losses.balance + aux.losses.z, (y, aux)

  (_, (y, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, aux, grads


def compiled_on_mesh(mesh_name: str, layer: MoEFeedForward, x):
  """`loss_and_grads` compiled for a mesh, and its arguments placed there: the layer's parameters
  split by the mesh's rules, the tokens over the batch axes."""
  mesh_cfg = {**MESHES, **UNSPLIT_MESHES}[mesh_name]
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.logical_rules(mesh_cfg.rules)
  graphdef, params = nnx.split(layer)
  with sharding.use_mesh(mesh, rules):
    params = jax.device_put(params, sharding.named_shardings(params, mesh, rules))
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(sharding.BATCH_AXES)))
    # A new function each time: jit's cache, keyed by the function, would hide a monkeypatch.
    step = jax.jit(lambda params, x: loss_and_grads(graphdef, params, x))
    compiled = step.lower(params, x).compile()
  return compiled, (params, x)


def assert_same(got, want, what):
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
  ):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{what}{path}")


def compare_with_one_device(mesh_name, cfg, x, layer=None):
  layer = layer or one_device_layer(cfg)
  graphdef, params = nnx.split(layer)
  want = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, x)
  compiled, args = compiled_on_mesh(mesh_name, layer, x)
  # Block on the result: collectives dispatched without waiting can deadlock on 2 CPU cores.
  y, aux, (grad_params, grad_x) = jax.device_get(jax.block_until_ready(compiled(*args)))
  want_y, want_aux, (want_params, want_x) = jax.device_get(want)
  assert_same(y, want_y, "y")
  assert_same(aux, want_aux, "aux")  # Losses and every routing statistic.
  assert_same(grad_x, want_x, "d/dx")
  assert_same(nnx.to_pure_dict(grad_params), nnx.to_pure_dict(want_params), "d/dparams")


def test_expert_axis_is_none_without_an_expert_split():
  assert expert_parallel.expert_axis() is None  # No mesh.
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
  with sharding.use_mesh(mesh, sharding.logical_rules("data")):
    assert expert_parallel.expert_axis() is None  # A mesh, experts replicated.
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=4, rules="data"))
  with sharding.use_mesh(mesh, sharding.logical_rules("data")):
    assert expert_parallel.expert_axis() is None  # An expert axis, but the rules do not use it.
  for name, mesh_cfg in MESHES.items():
    with sharding.use_mesh(sharding.make_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg.rules)):
      assert expert_parallel.expert_axis() == "expert", name


@pytest.mark.parametrize(
    "mesh_name, kw",
    [
        ("expert8", dict(top_k=2, activation="swiglu")),
        ("data2_expert4", dict(top_k=2)),
        ("data2_expert4", dict(top_k=1, activation="swiglu", group_size=8)),
        ("fsdp2_expert2_tensor2", dict(top_k=2, activation="swiglu")),  # Hidden split: psum.
        ("data8", dict(top_k=2)),  # No expert split: each device its own claims.
        ("fsdp8", dict(top_k=1, activation="swiglu")),
        ("data8_expert_rules", dict(top_k=2)),
        ("data4_tensor2", dict(top_k=2, activation="swiglu")),  # No expert split, hidden split.
    ],
)
def test_outputs_and_gradients_equal_the_one_device_path(mesh_name, kw):
  cfg = moe_cfg(**kw)
  layer = one_device_layer(cfg)
  x = tokens()
  index, _ = layer.routing_decisions(x)
  counts = np.bincount(np.asarray(index).ravel(), minlength=E)
  assert counts.min() != counts.max(), "routing must be uneven to test the ragged exchange"
  compare_with_one_device(mesh_name, cfg, x, layer)


@pytest.mark.parametrize("mesh_name", ["expert8", "data2_expert4"])
def test_every_token_to_one_expert(mesh_name):
  """All first choices on expert 5: one device receives every claim of every sender, filling its
  worst-case buffer; the others receive only second choices (or nothing, for top-1)."""
  cfg = moe_cfg(top_k=2)
  layer = one_device_layer(cfg)
  layer.router.w[...] = layer.router.w[...].at[0, 5].set(50.0)
  x = tokens().at[..., 0].set(2.0)  # A constant feature that the router reads as "expert 5".
  index, _ = layer.routing_decisions(x)
  assert (np.asarray(index)[..., 0] == 5).all()
  compare_with_one_device(mesh_name, cfg, x, layer)


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(op, result shape) of every collective in compiled HLO text; a tuple result (CPU all-to-alls
  are split per peer, all-reduces are combined) gives one entry per element."""
  found = []
  for line in hlo.splitlines():
    match = re.match(rf"\s*(?:ROOT )?%\S+ = (.*?) ({'|'.join(COLLECTIVES)})(?:-start)?\(", line)
    if match:
      for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1)):
        found.append((match.group(2), tuple(int(v) for v in dims.split(",") if v)))
  return found


def assert_tokens_travel_and_weights_stay(hlo: str, num_claims: int):
  """All-to-alls move the tokens; no all-gather of an expert bank [E, d, f] / [E, f, d] (possibly
  stacked over layers), and no collective over every claim of the batch (rows [k * B * L, ...]: the
  partitioner's way with the one-device path, which replicates the claims on every device)."""
  found = collectives(hlo)
  assert any(op == "all-to-all" for op, _ in found), "tokens must travel by all-to-all"
  for op, shape in found:
    assert not (op == "all-gather" and shape[-3:] in ((E, D, F), (E, F, D))), (op, shape)
    assert not (shape and shape[0] == num_claims), (op, shape)


@pytest.mark.parametrize("mesh_name", ["expert8", "data2_expert4"])
def test_layer_step_moves_tokens_not_weights(mesh_name, monkeypatch):
  layer = one_device_layer(moe_cfg(activation="swiglu"))
  x = tokens()
  num_claims = x.shape[0] * x.shape[1] * layer.cfg.top_k
  compiled, _ = compiled_on_mesh(mesh_name, layer, x)
  assert_tokens_travel_and_weights_stay(compiled.as_text(), num_claims)
  # The check can fail: on the same mesh, the one-device path left to the partitioner replicates
  # every claim (jax 0.11.2 gathers the tokens and all-reduces the experts' partial outputs; it
  # does not gather weights).
  monkeypatch.setattr(expert_parallel, "under_mesh", lambda: False)
  one_device_hlo = compiled_on_mesh(mesh_name, layer, x)[0].as_text()
  assert any(shape[:1] == (num_claims,) for _, shape in collectives(one_device_hlo))


def test_train_step_gathers_no_expert_weights():
  """The model's compiled train step (scanned layers, optimiser) on data=2 x expert=4."""
  model = ModelConfig(
      vocab_size=64,
      d_model=D,
      num_layers=2,
      num_heads=2,
      mlp_hidden=32,
      moe=moe_cfg(),
      sparse_every=1,
      max_len=8,
  )
  train = TrainConfig(steps=2, global_batch_size=8, seq_len=8, warmup_steps=1)
  cfg = ExperimentConfig(
      name="ep", model=model, train=train, data=DataConfig(), mesh=MESHES["data2_expert4"]
  )
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.logical_rules(cfg.mesh.rules)
  graphdef, rest, tx, state, state_sharding = steps.init_train_state(
      cfg, mesh, rules, abstract=True
  )
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {
      key: jax.ShapeDtypeStruct((8, 8), dtype, sharding=batch_sharding)
      for key, dtype in (("inputs", "int32"), ("targets", "int32"), ("weights", "float32"))
  }
  with sharding.use_mesh(mesh, rules):
    step = steps.make_train_step(
        graphdef, rest, cfg, tx, state_sharding=state_sharding, batch_sharding=batch_sharding
    )
    hlo = step.lower(state, batch).compile().as_text()
  assert_tokens_travel_and_weights_stay(hlo, num_claims=8 * 8 * cfg.model.moe.top_k)


@pytest.mark.parametrize("mesh_name", ["expert8", "data2_expert4"])
def test_sigmoid_scores_and_the_bias_match_the_reference_with_padding(mesh_name):
  """DeepSeek-V3's recipe (sigmoid scores, selection bias) through the shard_map path, with padded
  tokens: the float64 per-token reference's outputs, losses and loads (the bias replicated, the
  routing decided before the exchange)."""
  cfg = moe_cfg(top_k=2, score="sigmoid", balance="bias", sequence_balance_weight=1e-4)
  layer = one_device_layer(cfg)
  bias = np.linspace(-0.3, 0.3, E)[::-1].copy()
  layer.router_bias[...] = jnp.asarray(bias, jnp.float32)
  x = tokens()
  mask = np.asarray(jax.random.uniform(jax.random.key(4), x.shape[:2])) > 0.3
  mesh_cfg = MESHES[mesh_name]
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg.rules)
  graphdef, state = nnx.split(layer)
  with sharding.use_mesh(mesh, rules):
    state = jax.device_put(state, sharding.named_shardings(state, mesh, rules))
    batch = jax.sharding.NamedSharding(mesh, jax.P(sharding.BATCH_AXES))
    x_dev, mask_dev = jax.device_put(x, batch), jax.device_put(jnp.asarray(mask), batch)
    forward = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, train=True, token_mask_BL=m))
    y, aux = jax.device_get(jax.block_until_ready(forward(state, x_dev, mask_dev)))
  r = ref.reference_moe(
      x, ref.layer_params(layer), cfg, train=True, token_mask_BL=mask, bias_E=bias
  )
  unbiased = ref.reference_moe(x, ref.layer_params(layer), cfg, train=True, token_mask_BL=mask)
  assert not np.array_equal(unbiased.choices, r.choices), "the bias must move choices here"
  scale = np.max(np.abs(r.y))
  np.testing.assert_allclose(y, r.y, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)
  np.testing.assert_allclose(aux.losses.balance, r.balance, rtol=1e-5)
  np.testing.assert_allclose(aux.losses.sequence_balance, r.sequence_balance, rtol=1e-5)
  np.testing.assert_allclose(aux.losses.z, r.z, rtol=1e-5)
  np.testing.assert_allclose(aux.stats.expert_load, r.stats.expert_load, atol=1e-6)
