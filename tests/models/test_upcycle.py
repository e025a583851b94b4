"""Sparse upcycling (moe/models/upcycle.py): a sparse model started from a trained dense run computes the dense
model's logits at step 0 (renormalised gates, nothing dropped), with every scan layout; the routers are
the fresh ones; noise touches the experts only; bad sources are refused in one line; a resumed run
restores its own checkpoint; `experiments.train --config.train.init_from=...` runs."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import configs.dense
import configs.switch
import configs.upcycle
from moe.config.config_dict import experiment_from_config_dict
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig
from moe.models import upcycle
from moe.models.transformer import build
from moe.parallel import sharding
from moe.trainer import loop

REPO = pathlib.Path(__file__).resolve().parents[2]
# Five layers: the switch layout [dense, sparse, dense, sparse, dense] scans as an unrolled prefix of
# one layer and a period of two repeated twice (moe.models.transformer.scan_plan); the dense model as one layer x 5.
LAYERS = 5


def _dense_cd():
  cd = configs.dense.get_config("size=smoke")
  cd.model.num_layers = LAYERS
  cd.train.update(dict(steps=3, warmup_steps=1, eval_batches=0, checkpoint_every=3, log_every=1))
  return cd


def _sparse_model(k=1, dispatch="dropless", scan=True, renormalize=True) -> ModelConfig:
  """The smoke switch model with LAYERS layers, top-k, renormalised gates, nothing dropped."""
  cd = configs.switch.get_config(f"size=smoke,dispatch={dispatch}")
  cd.model.num_layers, cd.model.scan_layers = LAYERS, scan
  moe = cd.model.moe
  moe.top_k, moe.renormalize_gates = k, renormalize
  if dispatch != "dropless":  # cf = E / k gives C = S: no claim can drop.
    moe.train_capacity_factor = moe.eval_capacity_factor = moe.num_experts / k
    moe.allow_noncausal_routing = k > 1
  return experiment_from_config_dict(cd).model


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> pathlib.Path:
  """A dense smoke run of 3 steps (checkpoint 3), trained in-process."""
  workdir = tmp_path_factory.mktemp("dense")
  loop.train_and_evaluate(experiment_from_config_dict(_dense_cd()), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def dense(dense_run):
  """(dense config, its restored parameters, the dense model's logits on a fixed batch, the batch)."""
  cfg = upcycle.read_dense_config(dense_run)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  step, params = upcycle.restore_dense_params(dense_run, cfg, mesh, sharding.logical_rules("data"))
  assert step == 3
  model = build(cfg)
  nnx.update(model, params)
  tokens_BL = jax.random.randint(jax.random.key(7), (2, 64), 0, cfg.vocab_size)
  return cfg, params, _forward(model, tokens_BL)[0], tokens_BL


def _forward(model, tokens_BL):
  """(logits, aux) of `model`, jitted: one compilation instead of one per eager op."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))(state, tokens_BL)


def _upcycled(dense, target: ModelConfig, *, seed=1, noise=0.0):
  """The model of `target` initialised from `seed`, then upcycled; and its fresh parameters."""
  dense_cfg, dense_params, _, _ = dense
  model = build(target, seed=seed)
  fresh = nnx.state(model, nnx.Param)
  params = upcycle.upcycle(
      dense_params, dense_cfg, fresh, target, rng=jax.random.key(3), noise=noise
  )
  nnx.update(model, params)
  return model, fresh


def _flat(params) -> dict[str, np.ndarray]:
  return {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_flatten_with_path(nnx.as_pure(params))[0]
  }


# ----------------------------------------------------------------------------------------------------
# Step 0 computes the dense model.


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize(
    "k, dispatch", [(1, "dropless"), (2, "dropless"), (1, "gather"), (2, "gather")]
)
def test_upcycled_logits_equal_the_dense_models(dense, k, dispatch, scan):
  _, _, dense_logits, tokens_BL = dense
  model, _ = _upcycled(dense, _sparse_model(k, dispatch, scan))
  logits, aux = _forward(model, tokens_BL)
  assert float(np.max(aux.stats.dropped_fraction)) == 0.0
  np.testing.assert_allclose(logits, dense_logits, atol=1e-5, rtol=0)


def test_raw_gates_do_not_compute_the_dense_model(dense):
  """The test above has power: with the raw softmax gate (top-1, not renormalised) a sparse layer
  computes g(x) MLP(x) with g < 1, and the logits move."""
  _, _, dense_logits, tokens_BL = dense
  model, _ = _upcycled(dense, _sparse_model(renormalize=False))
  assert np.max(np.abs(_forward(model, tokens_BL)[0] - dense_logits)) > 1e-3


def test_a_dense_target_is_a_copy_in_another_layout(dense):
  dense_cfg, dense_params, dense_logits, tokens_BL = dense
  unrolled = dataclasses.replace(dense_cfg, scan_layers=False)
  model, _ = _upcycled(dense, unrolled)
  np.testing.assert_allclose(_forward(model, tokens_BL)[0], dense_logits, atol=1e-5, rtol=0)
  stacked = nnx.as_pure(dense_params)["periods"]["layers"][0]  # [5, ...] per weight.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  for i in range(LAYERS):
    np.testing.assert_array_equal(
        params["prefix"][i]["attention"]["q"], stacked["attention"]["q"][i]
    )
    np.testing.assert_array_equal(params["prefix"][i]["ffn"]["w_out"], stacked["ffn"]["w_out"][i])


# ----------------------------------------------------------------------------------------------------
# Where each parameter comes from.


def test_experts_are_copies_and_routers_are_the_fresh_init(dense):
  """Written out by hand for the unrolled layout: layer i of the dense checkpoint is index i of its
  stacked weights; only the routers come from the sparse model's own initialisation."""
  _, dense_params, _, _ = dense
  target = _sparse_model(scan=False)
  model, fresh = _upcycled(dense, target, seed=1)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  stacked = nnx.as_pure(dense_params)["periods"]["layers"][0]
  for i, sparse in enumerate(target.sparse_mask):
    layer = params["prefix"][i]
    for name in ("w_in", "w_out"):
      if sparse:
        for e in range(target.moe.num_experts):
          np.testing.assert_array_equal(layer["ffn"]["experts"][name][e], stacked["ffn"][name][i])
        np.testing.assert_array_equal(
            layer["ffn"]["router"]["w"], nnx.as_pure(fresh)["prefix"][i]["ffn"]["router"]["w"]
        )
      else:
        np.testing.assert_array_equal(layer["ffn"][name], stacked["ffn"][name][i])
  np.testing.assert_array_equal(params["embed"], nnx.as_pure(dense_params)["embed"])
  # Another initialisation changes the routers and nothing else.
  other, _ = _upcycled(dense, target, seed=2)
  a, b = _flat(nnx.state(model, nnx.Param)), _flat(nnx.state(other, nnx.Param))
  differ = sorted(key for key in a if not np.array_equal(a[key], b[key]))
  assert differ and all("'router'" in key for key in differ), differ
  assert len(differ) == target.num_sparse_layers


def test_scanned_and_unrolled_upcycling_agree_layer_by_layer(dense):
  """Noise included: its key depends on the layer and the weight, not on the layout. Scanned, layer
  i >= 1 is period position (i - 1) % 2, repeat (i - 1) // 2 (prefix of one layer)."""
  scanned, _ = _upcycled(dense, _sparse_model(scan=True), noise=0.1)
  unrolled, _ = _upcycled(dense, _sparse_model(scan=False), noise=0.1)
  s = nnx.as_pure(nnx.state(scanned, nnx.Param))
  u = nnx.as_pure(nnx.state(unrolled, nnx.Param))
  np.testing.assert_array_equal(s["prefix"][0]["ffn"]["w_in"], u["prefix"][0]["ffn"]["w_in"])
  for i in range(1, LAYERS):
    j, r = (i - 1) % 2, (i - 1) // 2
    period = s["periods"]["layers"][j]
    if i % 2:  # Sparse.
      for name in ("w_in", "w_out"):
        np.testing.assert_array_equal(
            period["ffn"]["experts"][name][r], u["prefix"][i]["ffn"]["experts"][name]
        )
    else:
      np.testing.assert_array_equal(period["ffn"]["w_in"][r], u["prefix"][i]["ffn"]["w_in"])
    np.testing.assert_array_equal(period["attention"]["k"][r], u["prefix"][i]["attention"]["k"])


def test_noise_changes_the_experts_and_nothing_else(dense):
  _, dense_params, _, _ = dense
  target = _sparse_model(scan=False)
  exact, _ = _upcycled(dense, target)
  noisy, _ = _upcycled(dense, target, noise=0.1)
  a, b = _flat(nnx.state(exact, nnx.Param)), _flat(nnx.state(noisy, nnx.Param))
  differ = sorted(key for key in a if not np.array_equal(a[key], b[key]))
  assert differ == sorted(k for k in a if "'experts'" in k)
  stacked = nnx.as_pure(dense_params)["periods"]["layers"][0]
  w_in_EDF = nnx.as_pure(nnx.state(noisy, nnx.Param))["prefix"][1]["ffn"]["experts"]["w_in"]
  ratio_EDF = np.asarray(w_in_EDF) / np.asarray(stacked["ffn"]["w_in"][1])[None] - 1.0
  # Multiplicative: w * (1 + 0.1 * N(0, 1)), independent per expert (64 x 256 draws each).
  assert np.std(ratio_EDF) == pytest.approx(0.1, rel=0.05)
  assert abs(np.mean(ratio_EDF)) < 0.01
  assert not np.array_equal(w_in_EDF[0], w_in_EDF[1])


# ----------------------------------------------------------------------------------------------------
# Refusals.


def _model(**kw) -> ModelConfig:
  fields = dict(vocab_size=258, d_model=64, num_layers=4, num_heads=2, mlp_hidden=256)
  return ModelConfig(**{**fields, **kw})


def _moe(**kw) -> MoEConfig:
  return MoEConfig(**{**dict(num_experts=4, expert_hidden=256), **kw})


@pytest.mark.parametrize(
    "target, named",
    [
        (_model(d_model=128, moe=_moe()), ["model.d_model 64 there, 128 here"]),
        (_model(num_layers=6, vocab_size=300, moe=_moe()), ["model.num_layers", "vocab_size"]),
        (_model(num_kv_heads=1, moe=_moe()), ["model.num_kv_heads"]),
        (_model(moe=_moe(expert_hidden=128)), ["model.moe.expert_hidden 128 here"]),
        (_model(moe=_moe(activation="swiglu")), ["model.moe.activation 'swiglu' here"]),
        (_model(mlp_hidden=512, moe=_moe(expert_hidden=256)), ["model.mlp_hidden 256 there"]),
        (_model(moe=_moe(shared_expert_hidden=64)), ["model.moe.shared_expert_hidden"]),
    ],
)
def test_other_shapes_are_refused_in_one_line(target, named):
  with pytest.raises(ValueError) as error:
    upcycle.check_source(_model(), target, "runs/dense")
  message = str(error.value)
  assert "\n" not in message and message.startswith("train.init_from='runs/dense'")
  for name in named:
    assert name in message


def test_a_sparse_source_is_refused():
  with pytest.raises(ValueError, match=r"^train.init_from='d' holds a sparse model \(2 of 4"):
    upcycle.check_source(_model(moe=_moe(), sparse_every=2), _model(moe=_moe()), "d")


def test_refusals_come_before_the_workdir_is_touched(dense_run, tmp_path):
  cd = configs.switch.get_config("size=smoke")  # 2 layers: the dense run has 5.
  cd.train.init_from = str(dense_run)
  with pytest.raises(ValueError, match=r"model.num_layers 5 there, 2 here"):
    loop.train_and_evaluate(experiment_from_config_dict(cd), str(tmp_path / "w"))
  cd.train.init_from = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match=r"holds no config.json"):
    loop.train_and_evaluate(experiment_from_config_dict(cd), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(init_from=""), "train.init_from='' must be None or the workdir"),
        (dict(init_from="d", init_from_noise=-0.1), "train.init_from_noise=-0.1 must be"),
        (dict(init_from_noise=0.1), "train.init_from_noise=0.1 needs train.init_from"),
    ],
)
def test_train_config_fields_are_validated(fields, message):
  with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
    TrainConfig(**fields)


def test_upcycle_config_arms_differ_only_in_the_model():
  sparse = experiment_from_config_dict(configs.upcycle.get_config("size=smoke"))
  dense = experiment_from_config_dict(configs.upcycle.get_config("size=smoke,arm=dense"))
  assert sparse.train == dense.train and sparse.data == dense.data
  assert sparse.train.steps == 10  # Half the smoke size's 20.
  moe = sparse.model.moe
  assert (moe.top_k, moe.renormalize_gates, moe.dispatch.value) == (2, True, "dropless")
  assert moe.routing_is_causal and moe.expert_hidden == dense.model.mlp_hidden
  upcycle.check_source(dense.model, sparse.model, "d")  # The dense arm's model upcycles to it.
  assert dense.model.moe is None


# ----------------------------------------------------------------------------------------------------
# The command line, and resuming.


def _cli_overrides(source: pathlib.Path) -> list[str]:
  return [
      f"--config.model.num_layers={LAYERS}",
      f"--config.train.init_from={source}",
      "--config.train.steps=4",
      "--config.train.warmup_steps=1",
      "--config.train.checkpoint_every=2",
      "--config.train.eval_batches=0",
  ]


def test_cli_upcycles_then_a_resumed_run_restores_its_own_checkpoint(dense_run, tmp_path, capsys):
  """experiments.train with init_from trains 4 steps (checkpoints 2 and 4). Then checkpoint 4 is
  deleted and the dense source moved away: the relaunch resumes from its own checkpoint 2, never reads
  the source, and ends bit-identical to the first run."""
  source, workdir = tmp_path / "dense", tmp_path / "upcycled"
  shutil.copytree(dense_run, source)
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.train",
          "--config=configs/switch.py:size=smoke",
          *_cli_overrides(source),
          f"--workdir={workdir}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),  # The same 8 fake devices as this process.
      timeout=300,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "Parameters upcycled: 2 sparse layers of 8 copies of the dense MLP" in result.stdout
  assert f"from {source} (dense, step 3)" in result.stdout
  straight = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "4" / "state")["params"]

  shutil.rmtree(workdir / "checkpoints" / "4")
  source.rename(tmp_path / "moved")
  cd = configs.switch.get_config("size=smoke")
  cd.model.num_layers = LAYERS
  cd.train.update(
      dict(init_from=str(source), steps=4, warmup_steps=1, checkpoint_every=2, eval_batches=0)
  )
  capsys.readouterr()
  loop.train_and_evaluate(experiment_from_config_dict(cd), str(workdir))
  out = capsys.readouterr().out
  assert "at step 2" in out and "Parameters upcycled" not in out
  resumed = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "4" / "state")["params"]
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
