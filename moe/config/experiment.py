"""One run's configuration: the model, the training, the data and the mesh, validated together.

Each section validates its own fields (`moe.config`, `moe.data.DataConfig`, `moe.parallel.sharding.MeshConfig`);
`ExperimentConfig` adds the checks that need two sections at once, so a bad combination also fails
before anything is traced or compiled. Build one from a config file with
`moe.config.config_dict.experiment_from_config_dict`.
"""

from __future__ import annotations

import dataclasses

from moe.config.data import DataConfig
from moe.config.mesh import MeshConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
  """One run: a name, the model, the training, the data and the mesh.

  Attributes:
    name: the run's display name.
    model: the decoder (`ModelConfig`).
    train: the optimisation and the loop (`TrainConfig`).
    data: what to read and how to tokenise it (`DataConfig`).
    mesh: the device mesh (`MeshConfig`; the default puts every device on the data axis).
  """

  name: str
  model: ModelConfig
  train: TrainConfig
  data: DataConfig
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def __post_init__(self):
    if self.train.seq_len > self.model.max_len:
      raise ValueError(
          f"train.seq_len={self.train.seq_len} must be <= model.max_len="
          f"{self.model.max_len} (the longest sequence the model accepts)"
      )
    if self.model.moe is not None and self.model.num_sparse_layers:
      self.model.moe.check_tokens(self.train.global_batch_size, self.train.seq_len)
