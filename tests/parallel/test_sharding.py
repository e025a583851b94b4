"""Meshes, rules and mesh-invariant routing on 8 fake CPU devices (see conftest.py)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.layers.moe_layer import MoEFeedForward
from moe.models.transformer import Transformer
from moe.parallel import sharding

MESHES = {
    "single": (sharding.MeshConfig(data=1), 1),
    "data8": (sharding.MeshConfig(data=8), 8),
    "data2_expert4": (sharding.MeshConfig(data=2, expert=4, rules="expert"), 8),
    "fsdp2_expert2_tensor2": (
        sharding.MeshConfig(data=1, fsdp=2, expert=2, tensor=2, rules="expert_tensor"),
        8,
    ),
}


def mesh_for(name):
  cfg, n = MESHES[name]
  return sharding.make_mesh(cfg, jax.devices()[:n]), sharding.logical_rules(cfg.rules)


def test_eight_devices():
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def test_mesh_fill_and_errors():
  assert sharding.MeshConfig(data=-1, expert=4).axis_sizes(8) == (2, 1, 4, 1)
  with pytest.raises(ValueError, match="needs 16 devices, but 8 are present"):
    sharding.MeshConfig(data=4, expert=4).axis_sizes(8)
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    sharding.MeshConfig(data=-1, expert=3).axis_sizes(8)
  with pytest.raises(ValueError, match="mesh.rules"):
    sharding.MeshConfig(rules="zero3")
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.MeshConfig(data=-1, fsdp=-1)


def _model_cfg(**moe_kw):
  moe = MoEConfig(
      num_experts=4,
      top_k=2,
      expert_hidden=32,
      train_capacity_factor=1.0,
      eval_capacity_factor=1.0,
      min_capacity=1,
      allow_noncausal_routing=True,
      **moe_kw,
  )
  return ModelConfig(
      vocab_size=64, d_model=16, num_layers=2, num_heads=2, mlp_hidden=32, moe=moe, sparse_every=1
  )


def test_divisibility_errors_before_compiling():
  mesh, _ = mesh_for("data2_expert4")
  cfg = MESHES["data2_expert4"][0]
  with pytest.raises(
      ValueError,
      match=r"train.global_batch_size=12 must be divisible by the " r"data-parallel size 8",
  ):
    sharding.check_divisibility(mesh, cfg, _model_cfg(), 12)
  model = _model_cfg()
  bad = dataclasses.replace(model, moe=dataclasses.replace(model.moe, num_experts=6, top_k=1))
  with pytest.raises(
      ValueError, match=r"model.moe.num_experts=6 must be divisible by the expert axis"
  ):
    sharding.check_divisibility(mesh, cfg, bad, 16)
  sharding.check_divisibility(mesh, cfg, model, 16)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_routing_and_drops_identical_across_meshes(dispatch):
  cfg = MoEConfig(
      num_experts=4,
      top_k=2,
      expert_hidden=32,
      dispatch=dispatch,
      train_capacity_factor=0.75,
      eval_capacity_factor=0.75,
      min_capacity=1,
  )
  x = jax.random.normal(jax.random.key(0), (16, 8, 16))
  results = {}
  for name in MESHES:
    mesh, rules = mesh_for(name)
    with sharding.use_mesh(mesh, rules):
      layer = MoEFeedForward(cfg, 16, rngs=nnx.Rngs(0))
      layer.router.w[...] = layer.router.w[...] * 5.0
      xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(sharding.BATCH_AXES)))
      decisions = nnx.jit(lambda m, x: m.routing_decisions(x, train=True))(layer, xs)
      y, aux = nnx.jit(lambda m, x: m(x, train=True))(layer, xs)
      results[name] = jax.device_get((decisions, y, aux.stats.dropped_fraction))
  (index0, kept0), y0, dropped0 = results["single"]
  assert not kept0.all() and kept0.any()
  for name, ((index, kept), y, dropped) in results.items():
    np.testing.assert_array_equal(index, index0, err_msg=name)
    np.testing.assert_array_equal(kept, kept0, err_msg=name)
    np.testing.assert_array_equal(dropped, dropped0, err_msg=name)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6, err_msg=name)


def test_parameters_are_created_split_by_their_logical_names():
  mesh, rules = mesh_for("fsdp2_expert2_tensor2")
  with sharding.use_mesh(mesh, rules):
    model = Transformer(_model_cfg(), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  specs = {
      ".".join(map(str, path)): v.get_value().sharding.spec for path, v in nnx.to_flat_state(params)
  }
  experts = [k for k in specs if "experts.w_" in k]
  assert experts
  for key in experts:  # [layers, E, d, f] or [layers, E, f, d]: E over 'expert', f over 'tensor'.
    spec = specs[key]
    assert spec[1] == "expert", key
    assert "tensor" in tuple(spec), key
  for key, spec in specs.items():
    if "attention.q" in key:
      assert spec[2] == "tensor", key  # [layers, d, heads, head_dim]


def test_tensor_axis_errors():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, tensor=2, rules="expert_tensor"))
  tensor_rules = sharding.MeshConfig(data=4, tensor=2, rules="expert_tensor")
  model = dataclasses.replace(_model_cfg(), num_heads=2, vocab_size=63)
  with pytest.raises(ValueError, match=r"model.vocab_size=63 must be divisible by mesh.tensor=2"):
    sharding.check_divisibility(mesh, tensor_rules, model, 8)
  with pytest.raises(ValueError, match=r"mesh.tensor=2 needs rules that split over it"):
    sharding.check_divisibility(
        mesh, sharding.MeshConfig(data=4, tensor=2, rules="expert"), _model_cfg(), 8
    )
  grouped = dataclasses.replace(
      _model_cfg(), moe=dataclasses.replace(_model_cfg().moe, group_size=32)
  )
  with pytest.raises(ValueError, match=r"model.moe.group_size=32 gives 2 routing groups"):
    sharding.check_divisibility(mesh, tensor_rules, grouped, 8, seq_len=8)
