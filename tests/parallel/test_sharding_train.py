"""Training on several meshes and processes gives the numbers of one device (8 fake CPU devices)."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import subprocess
import pathlib
import shutil
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import configs.switch
from moe.config.config_dict import experiment_from_config_dict
from moe.config.experiment import ExperimentConfig
from moe.config.enums import Dispatch
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig
from moe.data import DataConfig
from moe.parallel import sharding
from moe.trainer import loop, steps
from moe.trainer.run_records import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
MESHES = {
    "single": sharding.MeshConfig(data=1),
    "data8": sharding.MeshConfig(data=8),
    "data2_expert4": sharding.MeshConfig(data=2, expert=4, rules="expert"),
    "fsdp2_expert2_tensor2": sharding.MeshConfig(
        data=1, fsdp=2, expert=2, tensor=2, rules="expert_tensor"
    ),
}


def experiment(
    mesh: sharding.MeshConfig = sharding.MeshConfig(),
    dispatch: Dispatch = Dispatch.GATHER,
    **train_kw,
) -> ExperimentConfig:
  """Two layers ([dense, sparse]), E=4, top-2: with a capacity (einsum, gather; 1.0 in training, so
  tokens drop) or without (dropless)."""
  capacity = (None, None) if dispatch is Dispatch.DROPLESS else (1.0, 2.0)
  moe = MoEConfig(
      num_experts=4,
      top_k=2,
      expert_hidden=32,
      dispatch=dispatch,
      train_capacity_factor=capacity[0],
      eval_capacity_factor=capacity[1],
      min_capacity=1,
      jitter_eps=0.01,
      allow_noncausal_routing=True,  # Top-2 with a capacity: a later token can take a slot.
  )
  model = ModelConfig(
      vocab_size=258,
      d_model=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      mlp_hidden=64,
      moe=moe,
      sparse_every=2,
      max_len=32,
  )
  tc = dict(
      steps=3,
      global_batch_size=8,
      seq_len=32,
      warmup_steps=1,
      log_every=1,
      eval_every=100,
      eval_batches=0,
      checkpoint_every=3,
      learning_rate=1e-2,
  )
  tc.update(train_kw)
  return ExperimentConfig(
      name="sharded", model=model, train=TrainConfig(**tc), data=DataConfig(), mesh=mesh
  )


def _mesh(mesh_cfg: sharding.MeshConfig):
  n = np.prod([s for s in mesh_cfg.sizes_requested() if s > 0])
  return sharding.make_mesh(mesh_cfg, jax.devices()[:n]), sharding.logical_rules(mesh_cfg.rules)


@functools.cache
def initial_state() -> steps.TrainState:
  """The train state at step 0 on one device, on the host. Initialisation does not depend on the
  dispatch (the same parameters) nor on the mesh (`test_initialisation_under_a_mesh`), so the mesh
  tests start from this copy rather than compiling one initialisation per case (seconds each)."""
  mesh, rules = _mesh(MESHES["single"])
  return jax.device_get(steps.init_train_state(experiment(), mesh, rules)[3])


def one_step(cfg: ExperimentConfig, mesh_cfg: sharding.MeshConfig, batch):
  mesh, rules = _mesh(mesh_cfg)
  graphdef, rest, tx, abstract, state_sharding = steps.init_train_state(
      cfg, mesh, rules, abstract=True
  )
  state = jax.device_put(initial_state(), state_sharding)
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  batch_sharding = sharding.batch_sharding(mesh)
  with sharding.use_mesh(mesh, rules):
    step = steps.make_train_step(
        graphdef, rest, cfg, tx, state_sharding=state_sharding, batch_sharding=batch_sharding
    )
    state, metrics = step(state, steps.to_device(batch, batch_sharding))
  jax.block_until_ready((state, metrics))
  return state, metrics


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (cfg.train.global_batch_size, cfg.train.seq_len + 1), np.int32)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "weights": np.ones(tokens[:, 1:].shape, np.float32),
  }


@functools.cache
def one_device_step(dispatch: Dispatch):
  """The loss, metrics and updated parameters of one step on one device (host copies)."""
  cfg = experiment(dispatch=dispatch)
  state, metrics = one_step(cfg, MESHES["single"], _batch(cfg))
  return jax.device_get((nnx.as_pure(state.params), metrics))


@pytest.mark.parametrize("mesh", [name for name in MESHES if name != "single"])
@pytest.mark.parametrize("dispatch", list(Dispatch), ids=lambda d: d.value)
def test_one_step_is_the_same_on_every_mesh(dispatch, mesh):
  """Each dispatch path, trained one step on each mesh, gives the one-device numbers. Float32; loss
  to 1e-6 relative, updated parameters to 1e-5 relative + 1e-6 absolute (the meshes only change
  the order of reductions); which tokens drop and the expert loads exactly."""
  ref_params, ref_metrics = one_device_step(dispatch)
  dropped = ref_metrics["dropped_fraction"]
  # Top-2 at capacity factor 1.0 drops tokens (so drops are compared); dropless never does.
  assert dropped.any() if dispatch is not Dispatch.DROPLESS else not dropped.any(), dropped
  cfg = experiment(dispatch=dispatch)
  state, metrics = one_step(cfg, MESHES[mesh], _batch(cfg))
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  np.testing.assert_array_equal(metrics["dropped_fraction"], ref_metrics["dropped_fraction"])
  np.testing.assert_array_equal(metrics["expert_load"], ref_metrics["expert_load"])
  params = jax.device_get(nnx.as_pure(state.params))
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(path))


# DeepSeek-V3's recipe (sigmoid scores, the selection bias, its sequence-wise loss) with the balance
# loss pooled over the global batch: every term that reduces over the batch.
RECIPE = dict(score="sigmoid", balance="bias", balance_scope="global", sequence_balance_weight=1e-2)


def two_recipe_steps(mesh_cfg: sharding.MeshConfig, dispatch: Dispatch):
  """Two train steps of `experiment()` with RECIPE from its initial parameters and zero biases:
  the second routes with the bias the first set. Host copies of (biases, metrics of both steps)."""
  cfg = experiment(dispatch=dispatch)
  cfg = dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, **RECIPE)),
  )
  mesh, rules = _mesh(mesh_cfg)
  graphdef, rest, tx, abstract, state_sharding = steps.init_train_state(
      cfg, mesh, rules, abstract=True
  )
  state = initial_state()._replace(
      router_bias=jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract.router_bias)
  )
  state = jax.device_put(state, state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  records = []
  with sharding.use_mesh(mesh, rules):
    step = steps.make_train_step(
        graphdef, rest, cfg, tx, state_sharding=state_sharding, batch_sharding=batch_sharding
    )
    for seed in (0, 1):
      batch = _batch(cfg, seed)
      state, metrics = jax.block_until_ready(step(state, steps.to_device(batch, batch_sharding)))
      records.append(jax.device_get(metrics))
  return jax.device_get(nnx.as_pure(state.router_bias)), records


@functools.cache
def one_device_recipe_steps(dispatch: Dispatch):
  return two_recipe_steps(MESHES["single"], dispatch)


@pytest.mark.parametrize("mesh", [name for name in MESHES if name != "single"])
@pytest.mark.parametrize("dispatch", list(Dispatch), ids=lambda d: d.value)
def test_recipe_steps_are_the_same_on_every_mesh(dispatch, mesh):
  """The biases after two steps are bit-identical on every mesh (updated from the global load, an
  [E] all-reduce), and the pooled and per-sequence balance losses equal the one-device values."""
  want_bias, want = one_device_recipe_steps(dispatch)
  got_bias, got = two_recipe_steps(MESHES[mesh], dispatch)
  assert np.abs(jax.tree.leaves(want_bias)[0]).max() > 0  # The first step moved them.
  jax.tree.map(np.testing.assert_array_equal, got_bias, want_bias)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["expert_load"], w["expert_load"])
    for key in ("loss", "balance_loss", "sequence_balance_loss"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-6, err_msg=key)


# The sharding each rule table (moe.parallel.sharding.Rules) must give every parameter of `experiment()`,
# written out by hand from the tables' documented intent, not computed from them. Keys are the last
# two path components; scanned parameters carry a leading 'layers' axis (never split).
# d = embed, f = hidden, N/K = query/kv heads, H = head_dim, E = experts, V = vocab.
_ = None
_REPLICATED = {
    "embed": jax.P(_, _),  # [V, d]
    "final_norm/scale": jax.P(_),  # [d]
    "attention/q": jax.P(_, _, _, _),  # [layers, d, N, H]
    "attention/k": jax.P(_, _, _, _),  # [layers, d, K, H]
    "attention/v": jax.P(_, _, _, _),  # [layers, d, K, H]
    "attention/o": jax.P(_, _, _, _),  # [layers, N, H, d]
    "attention_norm/scale": jax.P(_, _),  # [layers, d]
    "ffn_norm/scale": jax.P(_, _),  # [layers, d]
    "ffn/w_in": jax.P(_, _, _),  # [layers, d, f] (the dense layer)
    "ffn/w_out": jax.P(_, _, _),  # [layers, f, d]
    "experts/w_in": jax.P(_, _, _, _),  # [layers, E, d, f]
    "experts/w_out": jax.P(_, _, _, _),  # [layers, E, f, d]
    "router/w": jax.P(_, _, _),  # [layers, d, E]
}
_FSDP = {  # ZeRO-3: every weight's d axis over 'fsdp'; norms whole.
    "embed": jax.P(_, "fsdp"),
    "attention/q": jax.P(_, "fsdp", _, _),
    "attention/k": jax.P(_, "fsdp", _, _),
    "attention/v": jax.P(_, "fsdp", _, _),
    "attention/o": jax.P(_, _, _, "fsdp"),
    "ffn/w_in": jax.P(_, "fsdp", _),
    "ffn/w_out": jax.P(_, _, "fsdp"),
    "experts/w_in": jax.P(_, _, "fsdp", _),
    "experts/w_out": jax.P(_, _, _, "fsdp"),
    "router/w": jax.P(_, "fsdp", _),
}
EXPECTED_SPECS = {
    "data": _REPLICATED,
    "fsdp": _REPLICATED | _FSDP,
    "expert": _REPLICATED
    | {
        "experts/w_in": jax.P(_, "expert", _, _),
        "experts/w_out": jax.P(_, "expert", _, _),
    },
    "expert_fsdp": _REPLICATED
    | _FSDP
    | {
        "experts/w_in": jax.P(_, "expert", "fsdp", _),
        "experts/w_out": jax.P(_, "expert", _, "fsdp"),
    },
    "expert_tensor": _REPLICATED
    | {  # Megatron: heads, hidden and vocab over 'tensor'; K/V whole; experts over 'expert'.
        "embed": jax.P("tensor", _),
        "attention/q": jax.P(_, _, "tensor", _),
        "attention/o": jax.P(_, "tensor", _, _),
        "ffn/w_in": jax.P(_, _, "tensor"),
        "ffn/w_out": jax.P(_, "tensor", _),
        "experts/w_in": jax.P(_, "expert", _, "tensor"),
        "experts/w_out": jax.P(_, "expert", "tensor", _),
    },
}
RULE_MESHES = {
    "data": sharding.MeshConfig(data=8, rules="data"),
    "fsdp": sharding.MeshConfig(data=2, fsdp=4, rules="fsdp"),
    "expert": sharding.MeshConfig(data=2, expert=4, rules="expert"),
    "expert_fsdp": sharding.MeshConfig(data=1, fsdp=2, expert=4, rules="expert_fsdp"),
    "expert_tensor": sharding.MeshConfig(data=1, fsdp=2, expert=2, tensor=2, rules="expert_tensor"),
}


def test_every_rule_set_is_in_the_table():
  assert set(EXPECTED_SPECS) == set(RULE_MESHES) == {r.value for r in sharding.Rules}


def _check_specs(rules: str, params: nnx.State) -> None:
  expected = EXPECTED_SPECS[rules]
  seen = set()
  for path, variable in nnx.to_flat_state(params):
    key = "/".join(map(str, path[-2:]))
    seen.add(key)
    assert variable.get_value().sharding.spec == expected[key], (rules, path)
  assert seen == set(expected)  # Every parameter kind of the model was checked.


@pytest.mark.parametrize("rules", list(EXPECTED_SPECS))
def test_every_leaf_has_the_sharding_written_out_for_its_rules(rules):
  """The shardings the train state is created with (abstract: nothing is computed; the real
  initialisation uses these as its out_shardings, see the next test)."""
  mesh, logical = _mesh(RULE_MESHES[rules])
  _, _, tx, state, _ = steps.init_train_state(experiment(), mesh, logical, abstract=True)
  _check_specs(rules, state.params)
  # Every optimiser moment (Adam's mu and nu) is split exactly like its parameter.
  checked = []

  def check(moment, param):
    checked.append(moment.sharding.spec == param.sharding.spec)
    return moment

  optax.tree_map_params(
      tx, check, state.opt_state, nnx.as_pure(state.params), transform_non_params=lambda x: x
  )
  assert len(checked) == 2 * len(jax.tree.leaves(state.params)) and all(checked)
  assert state.step.sharding.is_fully_replicated


@pytest.mark.parametrize("rules", ["expert_fsdp", "expert_tensor"])
def test_initialisation_under_a_mesh(rules):
  """Real arrays: each device holds exactly its slice of every split axis, and the parameters are
  those of one device (partitionable threefry), bit for bit."""
  mesh, logical = _mesh(RULE_MESHES[rules])
  state = steps.init_train_state(experiment(), mesh, logical)[3]
  _check_specs(rules, state.params)
  split = 0
  for path, variable in nnx.to_flat_state(state.params):
    value = variable.get_value()
    spec = EXPECTED_SPECS[rules]["/".join(map(str, path[-2:]))]
    want = tuple(n // (mesh.shape[a] if a else 1) for n, a in zip(value.shape, spec))
    assert {shard.data.shape for shard in value.addressable_shards} == {want}, (path, want)
    split += want != value.shape
  assert split >= 4  # Both expert banks, and the d (fsdp) or heads/hidden (tensor) axes.
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(jax.device_get(state)),
      jax.tree.leaves(initial_state()),
      strict=True,
  ):
    np.testing.assert_array_equal(a, b, err_msg=str(path))


def _run(cfg, workdir):
  loop.train_and_evaluate(cfg, str(workdir))
  return [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == "train"]


def test_checkpoint_moves_between_meshes(tmp_path, capsys):
  """Train 4 steps on data=8 (checkpoints 2 and 4); then, in a copy of that run without checkpoint 4
  (as after a crash), resume from checkpoint 2 on (data=2, expert=4): the losses of steps 3-4 match
  those of the run that stayed on data=8."""
  straight_dir, moved_dir = tmp_path / "straight", tmp_path / "moved"
  straight = _run(experiment(MESHES["data8"], steps=4, checkpoint_every=2), straight_dir)
  shutil.copytree(straight_dir, moved_dir)
  shutil.rmtree(moved_dir / "checkpoints" / "4")
  capsys.readouterr()
  moved = _run(experiment(MESHES["data2_expert4"], steps=4, checkpoint_every=2), moved_dir)
  assert f"Resumed from {moved_dir / 'checkpoints'} at step 2" in capsys.readouterr().out
  assert (moved_dir / "checkpoints" / "4").is_dir()  # Steps 3-4 were trained again, here.
  assert [r["step"] for r in moved] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in moved], [r["loss"] for r in straight], rtol=1e-5)


def test_bad_meshes_fail_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="needs 16 devices, but 8 are present"):
    loop.train_and_evaluate(experiment(sharding.MeshConfig(data=4, expert=4)), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="global_batch_size=12 must be divisible"):
    loop.train_and_evaluate(experiment(MESHES["data8"], global_batch_size=12), str(tmp_path / "b"))
  cfg = experiment(sharding.MeshConfig(data=1, expert=8, rules="expert"))
  with pytest.raises(ValueError, match="num_experts=4 must be divisible by the expert axis"):
    loop.train_and_evaluate(cfg, str(tmp_path / "c"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_processes_match_one_process(tmp_path):
  """Two processes x 4 CPU devices, through jax.distributed with gloo collectives, train 3 steps of
  the smoke switch config and log the losses of one process with 8 devices (this one, trained while
  the two run)."""
  overrides = dict(steps=3, log_every=1, eval_batches=0, checkpoint_every=3, warmup_steps=1)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  port = _free_port()
  logs = [tmp_path / f"log{i}.txt" for i in range(2)]
  procs = []
  for i, log_path in enumerate(logs):
    with open(log_path, "w") as log:
      procs.append(
          subprocess.Popen(
              [
                  sys.executable,
                  "-m",
                  "experiments.train",
                  "--config=configs/switch.py:size=smoke",
                  *(f"--config.train.{k}={v}" for k, v in overrides.items()),
                  "--config.mesh.expert=2",
                  f"--workdir={tmp_path / 'multi'}",
                  f"--coordinator_address=localhost:{port}",
                  "--num_processes=2",
                  f"--process_id={i}",
                  "--cpu_collectives",
              ],
              cwd=REPO,
              env=env,
              stdout=log,
              stderr=subprocess.STDOUT,
              text=True,
          )
      )
  try:
    single = configs.switch.get_config("size=smoke")
    single.train.update(**overrides)
    single.mesh.expert = 2
    assert jax.device_count() == 8
    loop.train_and_evaluate(experiment_from_config_dict(single), str(tmp_path / "single"))
    codes = [p.wait(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
  losses = {}
  for name in ("multi", "single"):
    records = read_metrics(tmp_path / name / "metrics.jsonl")
    losses[name] = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses["single"]) == 3
  np.testing.assert_allclose(losses["multi"], losses["single"], rtol=1e-5)
  assert (tmp_path / "multi" / "checkpoints" / "3").is_dir()
