"""`moe.config.experiment.ExperimentConfig`: the checks that need two sections at once."""

from __future__ import annotations

import pytest

from moe.config.data import DataConfig
from moe.config.experiment import ExperimentConfig
from moe.config.mesh import MeshConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig


def experiment(model_kw=None, **train_kw) -> ExperimentConfig:
  model = dict(vocab_size=258, d_model=8, num_layers=2, num_heads=2, mlp_hidden=8, max_len=64)
  model.update(model_kw or {})
  return ExperimentConfig(
      name="x",
      model=ModelConfig(**model),
      train=TrainConfig(**dict(dict(seq_len=64, global_batch_size=4), **train_kw)),
      data=DataConfig(),
  )


def test_sections_are_typed_and_the_mesh_defaults_to_data_parallel():
  exp = experiment()
  assert isinstance(exp.data, DataConfig) and exp.mesh == MeshConfig()


def test_seq_len_may_not_exceed_max_len():
  assert experiment(seq_len=64).train.seq_len == 64
  with pytest.raises(ValueError, match=r"train.seq_len=65 must be <= model.max_len=64"):
    experiment(seq_len=65)


def test_routing_groups_must_tile_the_batch():
  sparse = dict(moe=MoEConfig(num_experts=2, expert_hidden=8, group_size=48))
  with pytest.raises(ValueError, match=r"moe.group_size=48 must divide the tokens per batch"):
    experiment(sparse)  # 4 x 64 = 256 tokens.
  assert experiment(dict(moe=MoEConfig(num_experts=2, expert_hidden=8, group_size=32)))
