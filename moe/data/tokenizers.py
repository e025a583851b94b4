"""Tokenizers: a byte-level one and a cached SentencePiece one.

Both expose the same small interface (`Tokenizer`): `vocab_size`, `eos_id`
(the end-of-document separator inserted after every document when packing),
`pad_id` (only used for zero-weight padding rows of the last eval batch),
`encode`, `encode_documents` and `decode`, plus a `fingerprint` string that
identifies the exact id mapping and is part of every token-cache key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import functools
import hashlib
import io
import os
import pathlib
from typing import Protocol

import numpy as np

from moe import atomic_file


class Tokenizer(Protocol):
  """What the pipeline needs from a tokenizer."""

  vocab_size: int
  eos_id: int
  pad_id: int
  fingerprint: str

  def encode(self, text: str | bytes) -> np.ndarray:
    ...

  def encode_documents(self, docs: Iterable[str | bytes]) -> np.ndarray:
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ...


def stream_dtype(vocab_size: int) -> np.dtype:
  """Smallest dtype for a stored token stream (halves cache size and RAM)."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _concat_with_eos(parts: list[np.ndarray], eos_id: int, dtype) -> np.ndarray:
  """[d0, EOS, d1, EOS, ...] in one allocation: EOS after every document."""
  total = sum(len(p) for p in parts) + len(parts)
  out = np.empty(total, dtype=dtype)
  pos = 0
  for p in parts:
    out[pos : pos + len(p)] = p
    pos += len(p)
    out[pos] = eos_id
    pos += 1
  return out


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then EOS = 256 and PAD = 257.

  Vectorised: `encode` is one `np.frombuffer`, no Python loop per byte.
  """

  eos_id: int = 256
  pad_id: int = 257
  vocab_size: int = 258
  fingerprint: str = "byte-v1"

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns int32 ids [len(utf8 bytes)] (no EOS appended)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def encode_documents(self, docs: Iterable[str | bytes]) -> np.ndarray:
    """Returns the packed stream [d0, EOS, d1, EOS, ...] as uint16."""
    parts = [
        np.frombuffer(d.encode("utf-8") if isinstance(d, str) else bytes(d), np.uint8) for d in docs
    ]
    return _concat_with_eos(parts, self.eos_id, np.uint16)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Drops special ids; invalid UTF-8 (e.g. a cut multi-byte char) -> U+FFFD."""
    arr = np.asarray(ids).reshape(-1)
    arr = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
    return arr.tobytes().decode("utf-8", errors="replace")


# SentencePiece special ids. bos is disabled: documents are separated by EOS.
SP_PAD_ID, SP_UNK_ID, SP_EOS_ID = 0, 1, 2
# Below this vocabulary size there is no room for the 256 byte-fallback pieces.
_BYTE_FALLBACK_MIN_VOCAB = 384


class SentencePieceTokenizer:
  """Wraps a serialized SentencePiece model (pad=0, unk=1, eos=2, no bos)."""

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size: int = int(self._sp.vocab_size())
    self.eos_id: int = int(self._sp.eos_id())
    self.pad_id: int = int(self._sp.pad_id())
    self.fingerprint: str = "spm-" + hashlib.sha1(model_proto).hexdigest()[:16]

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    return cls(pathlib.Path(path).read_bytes())

  @staticmethod
  def _as_str(text: str | bytes) -> str:
    return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns int32 ids (no EOS appended)."""
    return np.asarray(self._sp.encode(self._as_str(text)), dtype=np.int32)

  def encode_documents(self, docs: Iterable[str | bytes]) -> np.ndarray:
    """Returns the packed stream [d0, EOS, d1, EOS, ...]."""
    texts = [self._as_str(d) for d in docs]
    # Batched encode runs in C++ threads (one call, not one per document).
    encoded = self._sp.encode(texts, num_threads=os.cpu_count() or 1)
    parts = [np.asarray(e, dtype=np.int32) for e in encoded]
    return _concat_with_eos(parts, self.eos_id, stream_dtype(self.vocab_size))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    arr = np.asarray(ids).reshape(-1)
    keep = (arr >= 0) & (arr < self.vocab_size) & (arr != self.pad_id) & (arr != self.eos_id)
    return self._sp.decode([int(i) for i in arr[keep]])


def _training_lines(texts: Iterable[str | bytes], max_bytes: int):
  """Yields non-empty lines of `texts` until `max_bytes` have been yielded.

  SentencePiece silently skips "sentences" longer than max_sentence_length, so
  documents are fed line by line; newlines are re-added by the '\\n' piece.
  """
  budget = max_bytes
  for text in texts:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    for line in text.split("\n"):
      if not line.strip():
        continue
      yield line
      budget -= len(line.encode("utf-8")) + 1
      if budget <= 0:
        return


def train_sentencepiece(texts: Iterable[str | bytes], *, vocab_size: int, max_bytes: int) -> bytes:
  """Trains a unigram SentencePiece model; returns the serialized proto.

  Args:
    texts: documents in a fixed order (only the first `max_bytes` are used).
    vocab_size: target vocabulary size (a soft limit for tiny corpora).
    max_bytes: bound on the training text, which bounds the training time.

  The model is lossless on its training alphabet: identity normalisation, no
  whitespace collapsing, '\\n' a piece of its own, and byte fallback (unknown
  characters become byte pieces) once vocab_size >= 384. No random input
  sampling, so the same text gives the same model on every host.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(texts, max_bytes),
      model_writer=writer,
      vocab_size=vocab_size,
      model_type="unigram",
      pad_id=SP_PAD_ID,
      unk_id=SP_UNK_ID,
      eos_id=SP_EOS_ID,
      bos_id=-1,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      user_defined_symbols=["\n"],
      byte_fallback=vocab_size >= _BYTE_FALLBACK_MIN_VOCAB,
      character_coverage=1.0 if vocab_size < 4096 else 0.9995,
      hard_vocab_limit=False,  # Tiny corpora may not support the full size.
      max_sentence_length=1 << 16,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )
  return writer.getvalue()


def load_or_train_sentencepiece(
    path: str | os.PathLike,
    texts_fn: Callable[[], Iterable[str | bytes]],
    *,
    vocab_size: int,
    max_bytes: int,
) -> SentencePieceTokenizer:
  """Loads the model at `path`, training and saving it there first if missing.

  Args:
    path: cache file for the serialized model; its name should encode
      everything the model depends on (data, vocab_size, max_bytes).
    texts_fn: called only on a cache miss; returns the training documents.
    vocab_size: see `train_sentencepiece`.
    max_bytes: see `train_sentencepiece`.
  """
  path = pathlib.Path(path)
  if not path.exists():
    proto = train_sentencepiece(texts_fn(), vocab_size=vocab_size, max_bytes=max_bytes)
    atomic_file.atomic_write(path, proto)
  return _load_sentencepiece(os.fspath(path))


@functools.lru_cache(maxsize=16)
def _load_sentencepiece(path: str) -> SentencePieceTokenizer:
  # Model files are never rewritten under the same name (the name encodes the
  # data and settings), so caching by path within a process is safe.
  return SentencePieceTokenizer.from_file(path)
