"""`moe.config.config_dict`: sections generated from the dataclasses accept every override and round-trip."""

from __future__ import annotations

import dataclasses

import pytest

from moe.config import config_dict
from moe.config.data import DataConfig
from moe.config.mesh import MeshConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig


@pytest.mark.parametrize(
    "cls,required",
    [
        (MoEConfig, dict(num_experts=4, expert_hidden=8)),
        (ModelConfig, dict(vocab_size=16, d_model=8, num_layers=2, num_heads=2, mlp_hidden=8)),
        (TrainConfig, {}),
        (DataConfig, {}),
        (MeshConfig, {}),
    ],
)
def test_section_round_trips_to_the_dataclass(cls, required):
  cd = config_dict.section(cls, **required)
  assert set(cd.keys()) == {f.name for f in dataclasses.fields(cls)}
  assert config_dict.from_dict(cls, cd, "x") == cls(**required)


def test_none_fields_hold_typed_placeholders_that_accept_overrides():
  cd = config_dict.section(
      ModelConfig, vocab_size=16, d_model=8, num_layers=2, num_heads=2, mlp_hidden=8
  )
  cd.num_kv_heads = 1  # A placeholder of type int: an int is accepted...
  with pytest.raises(TypeError):
    cd.head_dim = "wide"  # ...a string is not.
  moe = config_dict.section(MoEConfig, num_experts=4, expert_hidden=8, train_capacity_factor=2)
  moe.train_capacity_factor = 1.25  # Given as an int, stored as a float: 1.25 is accepted.
  moe.group_size = 32
  assert config_dict.from_dict(MoEConfig, moe, "x").group_size == 32
  assert config_dict.section(MoEConfig, num_experts=2, expert_hidden=8).router == "tokens_choose"


def test_section_names_unknown_and_missing_fields():
  with pytest.raises(ValueError, match=r"MoEConfig: unknown field\(s\) experts"):
    config_dict.section(MoEConfig, experts=4, num_experts=4, expert_hidden=8)
  with pytest.raises(ValueError, match="field num_experts has no default"):
    config_dict.section(MoEConfig, expert_hidden=8)
  with pytest.raises(ValueError, match=r"config.train: unknown field\(s\) stpes; allowed: seed"):
    config_dict.from_dict(TrainConfig, {"stpes": 3}, "config.train")
