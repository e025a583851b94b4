"""`moe.trainer.steps`: what the train step logs for each router, and that its loss is the weighted sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.expert_choice
import configs.switch
from moe.config.config_dict import experiment_from_config_dict
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
