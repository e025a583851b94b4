"""Training on several meshes and processes gives the numbers of one device (8 fake CPU devices)."""

from __future__ import annotations

import os
import socket
import subprocess
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moe import axes, sharding, train
from moe.config import ExperimentConfig, ModelConfig, MoEConfig, TrainConfig
from moe.data import DataConfig
from moe.train import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = {
    "single": sharding.MeshConfig(data=1),
    "data8": sharding.MeshConfig(data=8),
    "data2_expert4": sharding.MeshConfig(data=2, expert=4, rules="expert"),
    "fsdp2_expert2_tensor2": sharding.MeshConfig(data=1, fsdp=2, expert=2, tensor=2,
                                                 rules="expert_tensor"),
}


def experiment(mesh: sharding.MeshConfig | None = None, **train_kw) -> ExperimentConfig:
  moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, train_capacity_factor=1.0,
                  eval_capacity_factor=2.0, min_capacity=1, jitter_eps=0.01)
  model = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_hidden=64, moe=moe, sparse_every=2, max_len=32)
  tc = dict(steps=3, global_batch_size=8, seq_len=32, warmup_steps=1, log_every=1, eval_every=100,
            eval_batches=0, checkpoint_every=3, learning_rate=1e-2)
  tc.update(train_kw)
  return ExperimentConfig(name="sharded", model=model, train=TrainConfig(**tc), data=DataConfig(),
                          mesh=mesh)


def one_step(cfg: ExperimentConfig, mesh_cfg: sharding.MeshConfig, batch):
  n = np.prod([s for s in mesh_cfg.sizes_requested() if s > 0])
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n])
  rules = sharding.logical_rules(mesh_cfg.rules)
  graphdef, rest, tx, state, state_sharding = train.init_train_state(cfg, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  with sharding.use_mesh(mesh, rules):
    step = train.make_train_step(graphdef, rest, cfg, tx, state_sharding=state_sharding,
                                 batch_sharding=batch_sharding)
    state, metrics = step(state, train.to_device(batch, batch_sharding))
  jax.block_until_ready(state)
  return state, metrics


def _batch(cfg):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (cfg.train.global_batch_size, cfg.train.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones(tokens[:, 1:].shape, np.float32)}


def test_one_step_is_the_same_on_every_mesh():
  """Float32; loss to 1e-6 relative, updated parameters to 1e-5 relative + 1e-6 absolute (the meshes
  only change the order of reductions)."""
  cfg = experiment()
  batch = _batch(cfg)
  ref_state, ref_metrics = one_step(cfg, MESHES["single"], batch)
  ref_params = jax.device_get(nnx.as_pure(ref_state.params))
  for name, mesh_cfg in MESHES.items():
    state, metrics = one_step(cfg, mesh_cfg, batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(metrics["dropped_fraction"], ref_metrics["dropped_fraction"],
                                  err_msg=name)
    np.testing.assert_array_equal(metrics["expert_load"], ref_metrics["expert_load"], err_msg=name)
    params = jax.device_get(nnx.as_pure(state.params))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name} {path}")


def test_every_leaf_has_the_sharding_its_logical_axes_promise():
  cfg = experiment()
  mesh_cfg = MESHES["fsdp2_expert2_tensor2"]
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.logical_rules(mesh_cfg.rules)
  _, _, tx, state, _ = train.init_train_state(cfg, mesh, rules)
  table = dict(rules)
  checked_experts = 0
  for path, variable in nnx.to_flat_state(state.params):
    names = variable.get_metadata()["out_sharding"]
    want = jax.P(*(table[n] for n in names))
    value = variable.get_value()
    assert value.sharding.spec == want, (path, names)
    if axes.EXPERT in names:  # Really split: each device holds E / 2 experts.
      e_axis = names.index(axes.EXPERT)
      shard = value.addressable_shards[0].data
      assert shard.shape[e_axis] == cfg.model.moe.num_experts // 2, path
      checked_experts += 1
  assert checked_experts == 2  # w_in and w_out of the one sparse layer (GELU).
  # Every optimiser moment (Adam's mu and nu) is split exactly like its parameter.
  checked = []

  def check(moment, param):
    checked.append(moment.sharding.spec == param.sharding.spec)
    return moment

  optax.tree_map_params(tx, check, state.opt_state, nnx.as_pure(state.params),
                        transform_non_params=lambda x: x)
  assert len(checked) == 2 * len(jax.tree.leaves(state.params)) and all(checked)
  assert state.step.sharding.is_fully_replicated


def _run(cfg, workdir):
  train.train_and_evaluate(cfg, str(workdir))
  return [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == "train"]


def test_checkpoint_moves_between_meshes(tmp_path):
  """Save at step 2 on data=8, resume on (data=2, expert=4): the losses of steps 3-4 match a run that
  stayed on data=8."""
  straight = _run(experiment(MESHES["data8"], steps=4, checkpoint_every=2), tmp_path / "straight")
  _run(experiment(MESHES["data8"], steps=2, checkpoint_every=2), tmp_path / "moved")
  moved = _run(experiment(MESHES["data2_expert4"], steps=4, checkpoint_every=2), tmp_path / "moved")
  assert [r["step"] for r in moved] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in moved], [r["loss"] for r in straight], rtol=1e-5)


def test_bad_meshes_fail_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="needs 16 devices, but 8 are present"):
    train.train_and_evaluate(experiment(sharding.MeshConfig(data=4, expert=4)), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="global_batch_size=12 must be divisible"):
    train.train_and_evaluate(experiment(MESHES["data8"], global_batch_size=12), str(tmp_path / "b"))
  cfg = experiment(sharding.MeshConfig(data=1, expert=8, rules="expert"))
  with pytest.raises(ValueError, match="num_experts=4 must be divisible by the expert axis"):
    train.train_and_evaluate(cfg, str(tmp_path / "c"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_processes_match_one_process(tmp_path):
  """Two processes x 4 CPU devices, through jax.distributed with gloo collectives, train 3 steps of the
  smoke switch config and log the losses of one process with 8 devices."""
  common = ["--config=configs/switch.py:size=smoke", "--config.train.steps=3",
            "--config.train.log_every=1", "--config.train.eval_batches=0",
            "--config.train.checkpoint_every=3", "--config.mesh.expert=2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *common, f"--workdir={tmp_path / 'multi'}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       "--cpu_collectives"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  single_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                    JAX_PLATFORMS="cpu")
  single = subprocess.run([sys.executable, "-m", "experiments.train", *common,
                           f"--workdir={tmp_path / 'single'}"], cwd=REPO, env=single_env,
                          capture_output=True, text=True, timeout=240)
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
  losses = {}
  for name in ("multi", "single"):
    records = read_metrics(tmp_path / name / "metrics.jsonl")
    losses[name] = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses["single"]) == 3
  np.testing.assert_allclose(losses["multi"], losses["single"], rtol=1e-5)
  assert (tmp_path / "multi" / "checkpoints" / "3").is_dir()
