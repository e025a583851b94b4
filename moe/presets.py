"""What the config files share: the size table, config builders, the argument parser, matched baselines.

A config file is `get_config(arg)`: it parses its short argument string with `parse_arg` and calls one
builder here (`dense_config`, `switch_config`, `top2_config`, `expert_choice_config`). Builders return
an ml_collections ConfigDict laid out as `moe.config.experiment_from_config_dict` reads it: `name`,
`model` (every ModelConfig field; `model.moe` a section with every MoEConfig field, or None for dense),
`train` (every TrainConfig field) and `data` (every moe.data.DataConfig field). Every field is present,
with its type (fields that are None carry a typed placeholder), so any absl override such as
`--config.model.moe.num_experts=16` or `--config.model.num_kv_heads=2` works.

`matched_dense` derives the dense baseline of a sparse config by changing only `mlp_hidden`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict

from moe import accounting
from moe.config import ModelConfig, model_from_config_dict


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def config_module(name: str):
  """Imports `configs/<name>.py` by path, as `--config=configs/<name>.py` does."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/<name>.py:<arg>` as a ConfigDict."""
  return config_module(name).get_config(arg)


@dataclasses.dataclass(frozen=True)
class Size:
  """A model shape and its default training settings (see `SIZES`)."""

  d_model: int
  num_layers: int
  num_heads: int
  mlp_hidden: int
  sparse_every: int  # MoE layout: every sparse_every-th layer is sparse (Switch: 2).
  dtype: str
  remat: str
  seq_len: int
  batch: int
  steps: int
  learning_rate: float
  warmup_steps: int
  log_every: int
  eval_every: int
  eval_batches: int
  checkpoint_every: int


# smoke: seconds on a 2-core CPU, for tests and wiring checks. tiny: the README's CPU demo, dense and
# switch-8 within 10 minutes together on 2 cores (a training step takes 0.32-0.34 s on an idle 2-core CPU
# and up to 0.6 s on a busy one; 500 steps each took 8m44s in all on a shared machine and reached eval
# loss 1.70 / 1.69 nats per byte on Shakespeare, so 400 steps leave headroom). small: a one-GPU model. base / large: about Switch-Base /
# Switch-Large (Fedus et al. 2021, Table 9: 12 x 768, d_ff 3072; 24 x 1024, d_ff 4096), decoder-only,
# sparse every other layer as in the paper. Learning rates follow GPT-3 (Brown et al. 2020, Table 2.1)
# for similar widths; the CPU sizes use a larger rate because they train for a few hundred steps.
SIZES: dict[str, Size] = {
    "smoke": Size(d_model=64, num_layers=2, num_heads=2, mlp_hidden=256, sparse_every=2,
                  dtype="float32", remat="none", seq_len=64, batch=8, steps=20, learning_rate=3e-3,
                  warmup_steps=5, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=20),
    "tiny": Size(d_model=128, num_layers=4, num_heads=4, mlp_hidden=512, sparse_every=2,
                 dtype="float32", remat="none", seq_len=128, batch=32, steps=400, learning_rate=3e-3,
                 warmup_steps=40, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=400),
    "small": Size(d_model=512, num_layers=8, num_heads=8, mlp_hidden=2048, sparse_every=2,
                  dtype="bfloat16", remat="none", seq_len=512, batch=64, steps=10_000,
                  learning_rate=1e-3, warmup_steps=500, log_every=50, eval_every=500, eval_batches=20,
                  checkpoint_every=1000),
    "base": Size(d_model=768, num_layers=12, num_heads=12, mlp_hidden=3072, sparse_every=2,
                 dtype="bfloat16", remat="none", seq_len=1024, batch=256, steps=100_000,
                 learning_rate=6e-4, warmup_steps=2000, log_every=100, eval_every=2000,
                 eval_batches=50, checkpoint_every=5000),
    "large": Size(d_model=1024, num_layers=24, num_heads=16, mlp_hidden=4096, sparse_every=2,
                  dtype="bfloat16", remat="dots", seq_len=1024, batch=256, steps=100_000,
                  learning_rate=3e-4, warmup_steps=2000, log_every=100, eval_every=2000,
                  eval_batches=50, checkpoint_every=5000),
}

# Data choices of the `data=` argument. The built-in corpora are byte-level (the model's vocabulary is
# the byte tokenizer's); the TFDS ones use a 32k SentencePiece vocabulary (a power of two: the embedding
# splits evenly over any mesh).
DATA: dict[str, dict[str, Any]] = {
    "shakespeare": dict(source="shakespeare", tokenizer="byte"),
    "python_stdlib": dict(source="python_stdlib", tokenizer="byte"),
    "lm1b": dict(source="tfds", tfds_name="lm1b", tokenizer="sentencepiece", sp_vocab_size=32768,
                 tfds_eval_split="test"),  # lm1b has no validation split.
    "c4": dict(source="tfds", tfds_name="c4/en", tokenizer="sentencepiece", sp_vocab_size=32768),
}

DISPATCHES = ("gather", "einsum", "dropless")


# ----------------------------------------------------------------------------------------------------
# The argument string.


@dataclasses.dataclass(frozen=True)
class Arg:
  """One key of a config's argument string.

  Attributes:
    default: the value when the key is absent.
    choices: the allowed string values (None: any value of `kind`).
    kind: str, int or float: how the value is parsed.
    minimum: the smallest allowed number (int and float kinds).
  """

  default: Any
  choices: tuple[str, ...] | None = None
  kind: type = str
  minimum: float | None = None


SIZE_ARG = Arg("tiny", tuple(SIZES))
DATA_ARG = Arg("shakespeare", tuple(DATA))


def _convert(key: str, raw: str, spec: Arg) -> Any:
  if spec.choices is not None:
    if raw not in spec.choices:
      raise ValueError(f"config argument {key}={raw!r} is not allowed; {key} must be one of "
                       f"{', '.join(spec.choices)}")
    return raw
  what = {int: "an integer", float: "a number"}.get(spec.kind, "a string")
  bound = "" if spec.minimum is None else f" >= {spec.minimum}"
  try:
    value = spec.kind(raw)
  except ValueError:
    raise ValueError(f"config argument {key}={raw!r}: {key} must be {what}{bound}") from None
  if spec.minimum is not None and value < spec.minimum:
    raise ValueError(f"config argument {key}={raw!r}: {key} must be {what}{bound}")
  return value


def parse_arg(arg: str | None, spec: dict[str, Arg]) -> dict[str, Any]:
  """Parses "key=value,key=value" (big_vision style) into a dict with every key of `spec`.

  Args:
    arg: the string after the ':' of `--config=configs/x.py:arg`; None or '' gives the defaults.
    spec: the allowed keys and how to read their values.

  Raises:
    ValueError naming the key and the allowed keys or values, for an unknown key, a repeated key, a
    missing '=' or a bad value.
  """
  values = {key: s.default for key, s in spec.items()}
  seen = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value; allowed keys: {', '.join(spec)}")
    if key not in spec:
      raise ValueError(f"unknown config argument key {key!r}; allowed keys: {', '.join(spec)}")
    if key in seen:
      raise ValueError(f"config argument key {key!r} is given twice")
    seen.add(key)
    values[key] = _convert(key, raw, spec[key])
  return values


# ----------------------------------------------------------------------------------------------------
# Builders.


def _typed(value: Any, kind: type) -> Any:
  """A value, or a typed placeholder when it is None (so that an override can set it later)."""
  return config_dict.placeholder(kind) if value is None else value


def data_vocab_size(data: dict[str, Any]) -> int:
  """The model vocabulary for a data section: the byte tokenizer's size as `moe.data` reports it, or
  the SentencePiece size (a soft limit for small corpora: the table may have unused rows, never too few).
  """
  if data.get("tokenizer", "byte") == "byte":
    from moe import data as data_lib  # Lazy: the data package is only needed here.
    return data_lib.vocab_size(data_lib.DataConfig(source=data["source"], tokenizer="byte"))
  return int(data["sp_vocab_size"])


def data_section(data: str, seed: int = 0) -> ml_collections.ConfigDict:
  """Every DataConfig field, for the corpus named `data` (a key of `DATA`)."""
  fields = dict(source="shakespeare", tokenizer="byte", sp_vocab_size=8192,
                sp_train_bytes=20_000_000, tfds_name="lm1b",
                tfds_data_dir=config_dict.placeholder(str), tfds_text_key="text",
                tfds_train_split="train", tfds_eval_split="validation",
                cache_dir=config_dict.placeholder(str), seed=seed)
  fields.update(DATA[data])
  return ml_collections.ConfigDict(fields)


def dense_config(size: str = "tiny", data: str = "shakespeare", *,
                 name: str | None = None) -> ml_collections.ConfigDict:
  """The dense model of a size, with the size's training settings.

  Args:
    size: a key of `SIZES`.
    data: a key of `DATA`.
    name: the run name; default "dense_<size>".
  """
  s = SIZES[size]
  cd = ml_collections.ConfigDict()
  cd.name = name or f"dense_{size}"
  data_cd = data_section(data)
  cd.model = ml_collections.ConfigDict(dict(
      vocab_size=data_vocab_size(data_cd.to_dict()), d_model=s.d_model, num_layers=s.num_layers,
      num_heads=s.num_heads, num_kv_heads=config_dict.placeholder(int),
      head_dim=config_dict.placeholder(int), mlp_hidden=s.mlp_hidden, activation="gelu",
      max_len=s.seq_len, rope_theta=10_000.0, tie_embeddings=True, moe=None,
      sparse_every=s.sparse_every, first_dense=0, sparse_layers=config_dict.placeholder(tuple),
      scan_layers=True, remat=s.remat, dtype=s.dtype, norm_eps=1e-6))
  cd.train = ml_collections.ConfigDict(dict(
      seed=0, steps=s.steps, global_batch_size=s.batch, seq_len=s.seq_len,
      learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, schedule="cosine",
      end_lr_fraction=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0,
      log_every=s.log_every, eval_every=s.eval_every, eval_batches=s.eval_batches,
      checkpoint_every=s.checkpoint_every, keep_checkpoints=2,
      peak_flops_per_device=config_dict.placeholder(float), overwrite=False))
  cd.data = data_cd
  # The mesh: every device on 'data' by default; `--config.mesh.expert=4 --config.mesh.rules=expert`
  # etc. pick another layout (moe.sharding.MeshConfig, Rules).
  cd.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, rules="data"))
  return cd


def moe_section(model: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """Every MoEConfig field, with the Switch defaults (Fedus et al. 2021; ST-MoE loss weights).

  Args:
    model: the model section: experts default to its `mlp_hidden`, `activation` and `dtype`.
    **overrides: MoEConfig fields to change.
  """
  fields = dict(
      num_experts=8, top_k=1, expert_hidden=model.mlp_hidden, router="tokens_choose",
      dispatch="gather", train_capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4,
      group_size=None, priority="index", renormalize_gates=False, jitter_eps=0.0,
      balance_loss_weight=1e-2, z_loss_weight=1e-3, activation=model.activation,
      shared_expert_hidden=0, dtype=model.dtype, allow_noncausal_routing=False)
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"moe_section: unknown MoEConfig field(s) {sorted(unknown)}")
  fields.update(overrides)
  floats = ("train_capacity_factor", "eval_capacity_factor", "jitter_eps", "balance_loss_weight",
            "z_loss_weight")
  # A float field given as an int (cf=2) would be typed int and refuse a later override of 1.25.
  fields.update({k: float(fields[k]) for k in floats if fields[k] is not None})
  types = dict(group_size=int, **{k: float for k in floats})
  return ml_collections.ConfigDict(
      {k: _typed(v, types.get(k, type(v))) for k, v in fields.items()})


def sparse_config(size: str = "tiny", data: str = "shakespeare", *, name: str,
                  **moe_overrides) -> ml_collections.ConfigDict:
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


def switch_config(size: str = "tiny", data: str = "shakespeare", *, experts: int = 8,
                  dispatch: str = "gather") -> ml_collections.ConfigDict:
  """Switch Transformer: top-1, train cf 1.25, eval cf 2.0 (Fedus et al. 2021, Sec. 2.2 and 3)."""
  return sparse_config(size, data, name=f"switch{experts}_{size}", num_experts=experts, top_k=1,
                       dispatch=dispatch)


def top2_config(size: str = "tiny", data: str = "shakespeare", *, experts: int = 8,
                dispatch: str = "gather") -> ml_collections.ConfigDict:
  """GShard-style top-2 (Lepikhin et al. 2020). Our capacity has the factor k (C = cf * k * S / E), so
  the Switch capacity factors already leave room for both choices: no doubling of cf as in flaxformer."""
  return sparse_config(size, data, name=f"top2x{experts}_{size}", num_experts=experts, top_k=2,
                       dispatch=dispatch)


def expert_choice_config(size: str = "tiny", data: str = "shakespeare", *,
                         experts: int = 8) -> ml_collections.ConfigDict:
  """Experts choose (Zhou et al. 2022), their EC-CF2: each expert takes C = 2 * S / E tokens, two
  experts per token on average; same capacity at evaluation. No balance loss is needed (every expert
  is full by construction) but it is kept harmless at 0.

  `allow_noncausal_routing=True` is required: an expert's top-C choice over a group compares a token
  with later tokens of its sequence, so the routing of position t depends on positions > t. Training
  loss is then optimistic, and autoregressive sampling cannot reproduce training-time routing. We run it
  as the paper's comparison point, acknowledging the leak.
  """
  return sparse_config(size, data, name=f"ec{experts}_{size}", num_experts=experts, top_k=2,
                       router="experts_choose", train_capacity_factor=1.0, eval_capacity_factor=1.0,
                       balance_loss_weight=0.0, allow_noncausal_routing=True)


# Sparse configs a dense baseline can be matched to (`configs/dense.py:match=switch8`).
NAMED_SPARSE = ("switch4", "switch8", "switch16", "switch32", "switch64", "top2", "expert_choice")


def named_sparse(name: str, size: str = "tiny", data: str = "shakespeare") -> ml_collections.ConfigDict:
  """The default config of `configs/switch.py` (switch<E>), `top2.py` or `expert_choice.py` (8 experts).

  Args:
    name: one of `NAMED_SPARSE`.
    size, data: as `dense_config`.
  """
  if name not in NAMED_SPARSE:
    raise ValueError(f"sparse config name {name!r} is not one of {', '.join(NAMED_SPARSE)}")
  if name == "top2":
    return top2_config(size, data)
  if name == "expert_choice":
    return expert_choice_config(size, data)
  return switch_config(size, data, experts=int(name.removeprefix("switch")))


def model_config(cd: ml_collections.ConfigDict) -> ModelConfig:
  """The validated ModelConfig of a ConfigDict's `model` section (no data module needed)."""
  return model_from_config_dict(cd.model)


# ----------------------------------------------------------------------------------------------------
# Matched dense baselines.

MATCHES = ("active_flops", "total_params", "active_params")


def _measure(cfg: ModelConfig, seq_len: int, match: str) -> float:
  if match == "active_flops":
    return accounting.flops_per_token(cfg, seq_len, train=True).total
  counts = accounting.param_counts(cfg)
  return counts.total if match == "total_params" else counts.active


def matched_dense(cd: ml_collections.ConfigDict, match: str = "active_flops", *,
                  multiple: int = 8) -> ml_collections.ConfigDict:
  """The dense baseline of a sparse config: same everything, `model.moe=None`, a new `mlp_hidden`.

  Held fixed: width, depth, heads, vocabulary, embeddings, the dense activation (`model.activation`,
  even when the experts use another), sequence length, training and data. Only `mlp_hidden` of every
  (now dense) layer changes, to the multiple of `multiple` that best matches:

  * 'active_flops': `accounting.flops_per_token(..., train=True).total` at `train.seq_len`: what is
    computed, so the sparse side includes the router, the capacity slack (E * C / S expert evaluations
    per token, about cf * k, at the train capacity factor) and EINSUM dispatch. A Switch model with cf
    1.25 is thus matched by a dense FFN wider than its experts: the same compute budget per token.
  * 'active_params': `param_counts(...).active`: k experts per token, no capacity slack, which is the
    Switch paper's "FLOP-matched" baseline (Fedus et al. 2021, Sec. 2.4: T5-Base vs Switch-Base); with
    k=1 and expert_hidden == mlp_hidden it differs from the sparse model's own mlp_hidden only by the
    router's d * E weights per sparse layer.
  * 'total_params': `param_counts(...).total`: the same number of parameters.

  Args:
    cd: a sparse config (model.moe not None); not modified.
    match: one of `MATCHES`.
    multiple: mlp_hidden is rounded to a multiple of this (hardware-friendly shapes).

  Returns:
    A new ConfigDict named "<name>_dense_<match>". The mismatch is at most half a rounding step:
    `multiple / 2` hidden units of every layer.
  """
  if match not in MATCHES:
    raise ValueError(f"match={match!r} is not one of {', '.join(MATCHES)}")
  if cd.model.moe is None:
    raise ValueError("matched_dense needs a sparse config (model.moe is None)")
  seq_len = cd.train.seq_len
  target = _measure(model_config(cd), seq_len, match)
  out = copy.deepcopy(cd)
  out.model.moe = None
  out.mesh.rules = "data"
  dense = model_config(out)
  # Both measures are affine in mlp_hidden: solve from two points, then round to the best multiple.
  at = lambda f: _measure(dataclasses.replace(dense, mlp_hidden=f), seq_len, match)
  slope = (at(2 * multiple) - at(multiple)) / multiple
  exact = multiple + (target - at(multiple)) / slope
  lo = max(multiple, math.floor(exact / multiple) * multiple)
  best = min((lo, lo + multiple), key=lambda f: (abs(at(f) - target), f))
  out.model.mlp_hidden = int(best)
  out.name = f"{cd.name}_dense_{match}"
  return out


def describe(cd: ml_collections.ConfigDict) -> str:
  """One line: name, parameters and training FLOPs per token of a config."""
  return f"{cd.name}: {accounting.summary(model_config(cd), cd.train.seq_len)}"
