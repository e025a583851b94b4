"""The builders the config files share: the dense model of a size, its sparse variants, named configs.

A config file is `get_config(arg)`: it parses its argument string (`configs.arguments.parse_arg`) and
calls one builder here. Builders return an ml_collections ConfigDict laid out as
`moe.config.config_dict.experiment_from_config_dict` reads it: `name`, `model` (with `model.moe` a section or
None), `train`, `data` and `mesh`. Every section is generated from its dataclass
(`moe.config.config_dict.section`), so each default is written once, in `moe.config` and its siblings, and
every field is present and typed: any override such as `--config.model.moe.num_experts=16` works.
Builders set only what a size, a corpus or a paper's recipe changes, and have no defaults of their
own: the user-facing defaults are the config files' arguments (`configs.arguments.Arg`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs.sizes import DATA, SIZES
from moe import data as data_lib
from moe.config.config_dict import section
from moe.config.data import DataConfig
from moe.config.mesh import MeshConfig
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.config.train import TrainConfig


def data_vocab_size(data: DataConfig) -> int:
  """The model vocabulary for a corpus: the byte tokenizer's size as `moe.data` reports it, or the
  SentencePiece size (a soft limit for small corpora: the table may have unused rows, never too few).
  """
  if data.tokenizer is data_lib.TokenizerKind.BYTE:
    return data_lib.vocab_size(data)
  return data.sp_vocab_size


def dense_config(size: str, data: str, *, name: str | None = None) -> ml_collections.ConfigDict:
  """The dense model of a size, with the size's training settings.

  Args:
    size: a key of `configs.sizes.SIZES`.
    data: a key of `configs.sizes.DATA`.
    name: the run name; default "dense_<size>".
  """
  s = SIZES[size]
  cd = ml_collections.ConfigDict()
  cd.name = name or f"dense_{size}"
  cd.data = section(DataConfig, **DATA[data])
  cd.model = section(
      ModelConfig,
      vocab_size=data_vocab_size(DataConfig(**DATA[data])),
      d_model=s.d_model,
      num_layers=s.num_layers,
      num_heads=s.num_heads,
      mlp_hidden=s.mlp_hidden,
      max_len=s.seq_len,
      sparse_every=s.sparse_every,
      remat=s.remat,
      dtype=s.dtype,
  )
  cd.train = section(
      TrainConfig,
      steps=s.steps,
      global_batch_size=s.batch,
      seq_len=s.seq_len,
      learning_rate=s.learning_rate,
      warmup_steps=s.warmup_steps,
      log_every=s.log_every,
      eval_every=s.eval_every,
      eval_batches=s.eval_batches,
      checkpoint_every=s.checkpoint_every,
  )
  # Every device on 'data' by default; `--config.mesh.expert=4 --config.mesh.rules=expert` etc. pick
  # another layout (moe.parallel.sharding.MeshConfig, Rules).
  cd.mesh = section(MeshConfig)
  return cd


def moe_section(model: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
  """Every MoEConfig field: its defaults (Switch Transformer, Fedus et al. 2021; ST-MoE loss weights),
  8 experts as wide as the model's dense MLP, with its activation and dtype.

  Args:
    model: the model section.
    **overrides: MoEConfig fields to change.
  """
  fields: dict[str, Any] = dict(
      num_experts=8, expert_hidden=model.mlp_hidden, activation=model.activation, dtype=model.dtype
  )
  fields.update(overrides)
  return section(MoEConfig, **fields)


def sparse_config(
    size: str, data: str, *, name: str, **moe_overrides: Any
) -> ml_collections.ConfigDict:
  """The dense config of a size with its MoE layout switched on (`Size.sparse_every`).

  Args:
    size, data: as `dense_config`.
    name: the run name.
    **moe_overrides: MoEConfig fields (see `moe_section`).
  """
  cd = dense_config(size, data, name=name)
  if moe_overrides.get("dispatch") == "dropless":  # Computes every assignment: no capacity to set.
    moe_overrides = dict(moe_overrides, train_capacity_factor=None, eval_capacity_factor=None)
  cd.model.moe = moe_section(cd.model, **moe_overrides)
  cd.mesh.rules = "expert"  # Expert weights over the 'expert' axis once `mesh.expert` > 1.
  return cd


def switch_config(
    size: str, data: str, *, experts: int, dispatch: str
) -> ml_collections.ConfigDict:
  """Switch Transformer: top-1, train cf 1.25, eval cf 2.0 (Fedus et al. 2021, Sec. 2.2 and 3)."""
  return sparse_config(
      size, data, name=f"switch{experts}_{size}", num_experts=experts, top_k=1, dispatch=dispatch
  )


def top2_config(size: str, data: str, *, experts: int, dispatch: str) -> ml_collections.ConfigDict:
  """GShard-style top-2 (Lepikhin et al. 2020). Our capacity has the factor k (C = cf * k * S / E), so
  the Switch capacity factors already leave room for both choices: no doubling of cf as in flaxformer.

  Claims are served token-major (all of token t's claims before token t+1's), which makes top-2 with
  a capacity causal, unlike GShard's and flaxformer's rank-major order, where a later token's first
  choice can take an earlier token's second-choice slot. Measured at tiny size over 3 seeds
  (docs/RESULTS.md, finding f), token-major dropped 4.0% of claims against 3.8% and ended +0.007 ±
  0.007 nats per byte from rank-major: no cost we can resolve, for an eval loss that does not read the
  future. `--config.model.moe.serving_order=rank_major` (with `allow_noncausal_routing=True`) is the
  GShard order.
  """
  return sparse_config(
      size,
      data,
      name=f"top2x{experts}_{size}",
      num_experts=experts,
      top_k=2,
      dispatch=dispatch,
      serving_order="token_major",
  )


def expert_choice_config(size: str, data: str, *, experts: int) -> ml_collections.ConfigDict:
  """Experts choose (Zhou et al. 2022), their EC-CF2: each expert takes C = 2 * S / E tokens, two
  experts per token on average; same capacity at evaluation. There is no balance loss (every expert is
  full by construction), so its weight is 0.

  `allow_noncausal_routing=True` is required: an expert's top-C choice over a group compares a token
  with later tokens of its sequence, so the routing of position t depends on positions > t. Training
  loss is then optimistic, and autoregressive sampling cannot reproduce training-time routing. We run it
  as the paper's comparison point, acknowledging the leak.
  """
  return sparse_config(
      size,
      data,
      name=f"ec{experts}_{size}",
      num_experts=experts,
      top_k=2,
      router="experts_choose",
      train_capacity_factor=1.0,
      eval_capacity_factor=1.0,
      balance_loss_weight=0.0,
      allow_noncausal_routing=True,
  )
