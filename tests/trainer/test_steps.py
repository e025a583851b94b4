"""`moe.trainer.steps`: what the train step logs for each router, and that its loss is the weighted sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.expert_choice
import configs.switch
import moe_reference as ref
from moe.config.config_dict import experiment_from_config_dict
from moe.config.experiment import ExperimentConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig
from moe.data import DataConfig
from moe.parallel import sharding
from moe.trainer import steps


def one_step(cd):
  """(cfg, the first step's metrics, `reference_loss` of the initial model on the step's batch)."""
  cfg = experiment_from_config_dict(cd)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  rules = sharding.logical_rules(cfg.mesh.rules)
  graphdef, rest, tx, state, _ = steps.init_train_state(cfg, mesh, rules)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (cfg.train.global_batch_size, cfg.train.seq_len + 1), np.int32)
  weights = np.ones(tokens[:, 1:].shape, np.float32)
  weights[0, cfg.train.seq_len // 2 :] = 0.0  # Padding, so the mean over tokens is weighted.
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
  key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)  # The step's router jitter key.
  with sharding.use_mesh(mesh, rules):
    reference = reference_loss(cfg, nnx.merge(graphdef, state.params, rest), batch, key)
    step = steps.make_train_step(graphdef, rest, cfg, tx)
    _, metrics = step(state, steps.to_device(batch))
  return cfg, jax.device_get(metrics), reference


def reference_loss(cfg, model, batch, key) -> tuple[float, float]:
  """(loss, ce) by hand: float64 log-softmax cross-entropy averaged over the real tokens, plus the
  weighted router losses averaged over the sparse layers (the balance loss when tokens choose)."""
  mask = batch["weights"] > 0
  logits, aux = model(jnp.asarray(batch["inputs"]), train=True, rng=key, token_mask_BL=mask)
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  target_log_p = np.take_along_axis(log_p, batch["targets"][..., None], axis=-1)[..., 0]
  ce = float(-(target_log_p * batch["weights"]).sum() / batch["weights"].sum())
  moe = cfg.model.moe
  loss = ce + moe.z_loss_weight * float(np.mean(np.asarray(aux.losses.z, np.float64)))
  if moe.router.value == "tokens_choose":
    loss += moe.balance_loss_weight * float(np.mean(np.asarray(aux.losses.balance, np.float64)))
  return loss, ce


@pytest.mark.parametrize(
    "module,balance_logged", [(configs.switch, True), (configs.expert_choice, False)]
)
def test_balance_loss_is_logged_only_when_tokens_choose(module, balance_logged):
  """Experts choose has no balance loss (every expert is full by construction): nothing is logged,
  rather than a constant (flaxformer reports 0.0)."""
  cfg, metrics, (loss, ce) = one_step(module.get_config("size=smoke"))
  assert ("balance_loss" in metrics) == balance_logged
  assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
  assert {"z_loss", "dropped_fraction", "expert_load", "router_entropy", "grad_norm"} <= set(
      metrics
  )


# ----------------------------------------------------------------------------------------------------
# Auxiliary-loss-free balancing: the selection bias is state the step updates, not a parameter.


def _bias_experiment(balance="bias", **model_kw) -> ExperimentConfig:
  moe = MoEConfig(
      num_experts=4,
      top_k=2,
      expert_hidden=32,
      score="sigmoid",
      balance=balance,
      bias_update_rate=1e-3,
      train_capacity_factor=None,
      eval_capacity_factor=None,
  )
  model = dict(vocab_size=258, d_model=32, num_layers=2, num_heads=2, mlp_hidden=64, max_len=16)
  model.update(model_kw)
  train = TrainConfig(
      steps=3,
      global_batch_size=4,
      seq_len=16,
      warmup_steps=0,
      learning_rate=3e-2,
      weight_decay=0.5,  # Would visibly shrink the bias if the optimiser saw it.
      schedule="constant",
  )
  return ExperimentConfig(
      name="bias", model=ModelConfig(moe=moe, **model), train=train, data=DataConfig()
  )


def _batches(cfg, n):
  rng = np.random.default_rng(1)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, 256, (cfg.train.global_batch_size, cfg.train.seq_len + 1), np.int32)
    weights = np.ones(tokens[:, 1:].shape, np.float32)
    weights[0, 10:] = 0.0  # Padding: it claims nothing and counts in no load.
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights})
  return out


def _ffn_inputs(model, batch):
  """The input of each (unscanned) layer's feed-forward, in float64: what its router sees."""
  x = model.embed_tokens(jnp.asarray(batch["inputs"]))
  inputs = []
  for block in model.prefix:
    x = x + block.attention(block.attention_norm(x))
    inputs.append(np.asarray(block.ffn_norm(x), np.float64))
    x, _ = block.feed_forward(x, train=True, rng=None, token_mask_BL=batch["weights"] > 0)
  return inputs


def test_bias_follows_the_reference_update_and_the_optimiser_never_sees_it():
  """Three steps with weight decay on: each sparse layer's bias is the float64 reference's sign
  update from that step's choices (by the reference router on the layer's input, padding left out),
  exactly; it is in no parameter and no optimiser state."""
  cfg = _bias_experiment(scan_layers=False)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  rules = sharding.logical_rules(cfg.mesh.rules)
  graphdef, rest, tx, state, _ = steps.init_train_state(cfg, mesh, rules)
  paths = lambda tree: [
      jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]
  assert not any("router_bias" in p for p in paths(state.params) + paths(state.opt_state))
  assert len(jax.tree.leaves(state.router_bias)) == 2  # One [E] per sparse layer.
  step = steps.make_train_step(graphdef, rest, cfg, tx)
  moved = False
  for batch in _batches(cfg, 3):
    model = nnx.merge(graphdef, state.params, state.router_bias, rest)
    real = batch["weights"].reshape(-1, cfg.train.seq_len) > 0
    want = []
    for block, h in zip(model.prefix, _ffn_inputs(model, batch)):
      layer = block.ffn
      bias = np.asarray(layer.router_bias[...], np.float64)
      r = ref.reference_moe(h, ref.layer_params(layer), layer.cfg, True, real, bias_E=bias)
      want.append(ref.reference_bias_update(bias, r.choices, real, layer.cfg.bias_update_rate))
    with sharding.use_mesh(mesh, rules):
      state, _ = step(state, steps.to_device(batch))
    got = [np.asarray(state.router_bias["prefix"][i]["ffn"]["router_bias"][...]) for i in (0, 1)]
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-9)
    moved = moved or any(np.abs(w).max() > 0 for w in want)
  assert moved


def test_scanned_layers_update_their_own_bias_rows():
  """A prefix sparse layer and a scanned period (sparse_layers 0, 1, 3 of 5): each bias, stacked or
  not, moves by the sign of its own layer's logged load."""
  cfg = _bias_experiment(num_layers=5, sparse_layers=(0, 1, 3))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  rules = sharding.logical_rules(cfg.mesh.rules)
  graphdef, rest, tx, state, _ = steps.init_train_state(cfg, mesh, rules)
  with sharding.use_mesh(mesh, rules):
    new, metrics = steps.make_train_step(graphdef, rest, cfg, tx)(
        state, steps.to_device(_batches(cfg, 1)[0])
    )
  load = np.asarray(metrics["expert_load"], np.float64)
  assert load.shape == (3, 4)
  want = 1e-3 * np.sign(load.mean(axis=1, keepdims=True) - load)
  model = nnx.merge(graphdef, new.params, new.router_bias, rest)
  assert (model.prefix_len, model.period_len, model.repeats) == (1, 2, 2)
  np.testing.assert_allclose(model.prefix[0].ffn.router_bias[...], want[0], atol=1e-9)
  np.testing.assert_allclose(model.periods.layers[0].ffn.router_bias[...], want[1:], atol=1e-9)
  assert len({tuple(row) for row in want}) > 1, "the layers' loads must differ to tell them apart"


@pytest.mark.parametrize("balance", ["loss", "bias", "none"])
def test_the_loss_holds_the_balance_loss_only_when_it_balances(balance):
  cfg = _bias_experiment(balance=balance)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  rules = sharding.logical_rules(cfg.mesh.rules)
  graphdef, rest, tx, state, _ = steps.init_train_state(cfg, mesh, rules)
  assert bool(jax.tree.leaves(state.router_bias)) == (balance == "bias")
  with sharding.use_mesh(mesh, rules):
    _, m = steps.make_train_step(graphdef, rest, cfg, tx)(
        state, steps.to_device(_batches(cfg, 1)[0])
    )
  moe = cfg.model.moe
  want = float(m["ce"]) + moe.z_loss_weight * float(m["z_loss"])
  if balance == "loss":
    want += moe.balance_loss_weight * float(m["balance_loss"])
  assert float(m["balance_loss"]) > 0  # Logged whatever balances.
  assert float(m["loss"]) == pytest.approx(want, rel=1e-6)


def test_abstract_train_state_runs_nothing(caplog):
  """`abstract=True` builds the state's shapes and shardings without running or compiling any
  computation, as compiling for devices that cannot run code (a TPU topology on the CPU) needs. It
  failed while optax's `tree_map_params` ran the optimiser's `init` on a placeholder (it compiled and
  ran `convert_element_type` for the step count)."""
  cfg = experiment_from_config_dict(configs.switch.get_config("size=smoke"))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  jax.clear_caches()  # Otherwise a computation compiled by an earlier test would run unlogged.
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    _, _, _, state, _ = steps.init_train_state(
        cfg, mesh, sharding.logical_rules(cfg.mesh.rules), abstract=True
    )
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state))
  compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert not compiled, compiled
