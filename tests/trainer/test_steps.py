"""`moe.trainer.steps`: what the train step logs for each router, and that its loss is the weighted sum."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import configs.expert_choice
import configs.switch
from moe.config.config_dict import experiment_from_config_dict
from moe.parallel import sharding
from moe.trainer import steps


def one_step(cd):
  cfg = experiment_from_config_dict(cd)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  rules = sharding.logical_rules(cfg.mesh.rules)
  graphdef, rest, tx, state, _ = steps.init_train_state(cfg, mesh, rules)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (cfg.train.global_batch_size, cfg.train.seq_len + 1), np.int32)
  batch = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "weights": np.ones(tokens[:, 1:].shape, np.float32),
  }
  with sharding.use_mesh(mesh, rules):
    step = steps.make_train_step(graphdef, rest, cfg, tx)
    _, metrics = step(state, steps.to_device(batch))
  return cfg, jax.device_get(metrics)


@pytest.mark.parametrize(
    "module,balance_logged", [(configs.switch, True), (configs.expert_choice, False)]
)
def test_balance_loss_is_logged_only_when_tokens_choose(module, balance_logged):
  """Experts choose has no balance loss (every expert is full by construction): nothing is logged,
  rather than a constant (flaxformer reports 0.0)."""
  cfg, metrics = one_step(module.get_config("size=smoke"))
  assert ("balance_loss" in metrics) == balance_logged
  moe = cfg.model.moe
  balance = metrics["balance_loss"] if balance_logged else 0.0
  assert float(metrics["loss"]) == pytest.approx(
      float(metrics["ce"])
      + moe.balance_loss_weight * balance
      + moe.z_loss_weight * float(metrics["z_loss"]),
      rel=1e-6,
  )
  assert {"z_loss", "dropped_fraction", "expert_load", "router_entropy", "grad_norm"} <= set(
      metrics
  )
