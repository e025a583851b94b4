"""The TFDS half of the pipeline: documents read lazily, tokenised and packed per row.

A TFDS split has too many documents to tokenise up front (unlike the built-in corpora, see
`corpora`), so training row r of every global batch is its own packed stream (grain
ConcatThenSplitIterDataset) over documents r, r+G, r+2G, ... of the per-epoch shuffled document
order (G = global_batch_size). Rows depend on (seed, G, r) only, so global batch i is the same for
any process count, and a process tokenises only the documents of its own rows.

`pipeline` turns what this module yields ([rows, seq_len + 1] token windows, a validation token
stream) into batches; `tfds_source` finds and opens the prepared dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
import pathlib
import re

import grain
import numpy as np

from moe.config.data import DataConfig
from moe.data import corpora, tfds_source, tokenizers as tok_lib

# Documents are read in the thread that packs them (the caller prefetches whole batches).
_READ_IN_CALLER = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _tag(s: str) -> str:
  """A split or feature name as a file-name part."""
  return re.sub(r"[^A-Za-z0-9_.-]", "_", s)


def _prepared(cfg: DataConfig, *splits: str) -> tfds_source.PreparedDataset:
  return tfds_source.locate_prepared(cfg.tfds_name, cfg.tfds_data_dir, splits)


def _getitems(src, indices: Sequence[int]) -> list:
  if hasattr(src, "__getitems__"):  # One batched array_record read.
    return list(src.__getitems__(list(indices)))
  return [src[i] for i in indices]


def _text(example, key: str):
  try:
    return example[key]
  except (KeyError, TypeError) as e:
    keys = list(example) if hasattr(example, "keys") else type(example)
    raise KeyError(
        f"data.tfds_text_key={key!r} is not a feature of the dataset; features: {keys}."
    ) from e


def tokenizer(cfg: DataConfig, cache_dir: pathlib.Path) -> tok_lib.SentencePieceTokenizer:
  """The SentencePiece model of cfg's training split, trained once and cached next to the data.

  Args:
    cfg: a TFDS data config (tfds_name, splits, text key, sp_* settings).
    cache_dir: where to cache when the prepared dataset's directory is read-only.
  """
  prepared = _prepared(cfg, cfg.tfds_train_split)
  cache = tfds_source.moe_cache_dir(prepared, cache_dir)
  path = cache / (
      f"spm-{_tag(cfg.tfds_train_split)}-{_tag(cfg.tfds_text_key)}"
      f"-v{cfg.sp_vocab_size}-b{cfg.sp_train_bytes}"
      f"-{prepared.fingerprint}.model"
  )

  def texts():
    src = tfds_source.open_split(prepared, cfg.tfds_train_split)
    # A fixed (seed 0, not cfg.seed) shuffled order: the byte budget then
    # samples the whole split and every seed shares one tokenizer.
    order = grain.MapDataset.range(len(src)).shuffle(seed=0)
    for start in range(0, len(src), 256):
      idx = [order[i] for i in range(start, min(start + 256, len(src)))]
      for ex in _getitems(src, idx):
        yield _text(ex, cfg.tfds_text_key)

  return tok_lib.load_or_train_sentencepiece(
      path, texts, vocab_size=cfg.sp_vocab_size, max_bytes=cfg.sp_train_bytes
  )


class _EncodeDoc:
  """Example -> {'tokens': int32 [n + 1]}, the document followed by EOS."""

  def __init__(self, tok: tok_lib.Tokenizer, key: str):
    self._tok, self._key = tok, key

  def __call__(self, example) -> dict[str, np.ndarray]:
    ids = self._tok.encode(_text(example, self._key))
    return {"tokens": np.append(ids, self._tok.eos_id).astype(np.int32)}


def _stack_rows(rows: tuple[dict[str, np.ndarray], ...]) -> np.ndarray:
  return np.stack([r["tokens"] for r in rows])


def train_windows(
    cfg: DataConfig,
    tok: tok_lib.Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    first_row: int,
    local_batch: int,
) -> grain.IterDataset:
  """Rows [first_row, first_row + local_batch) of every global batch, forever.

  Returns:
    An IterDataset of int32 [local_batch, seq_len + 1] token windows; row r packs documents
    r, r + global_batch_size, ... of the document order, reshuffled every epoch from cfg.seed.
  """
  prepared = _prepared(cfg, cfg.tfds_train_split)
  src = tfds_source.open_split(prepared, cfg.tfds_train_split)
  if len(src) == 0:
    raise ValueError(f"Split {cfg.tfds_train_split!r} of {prepared.name} is empty.")
  # shuffle() before repeat(): a new document order every epoch.
  docs = grain.MapDataset.source(src).shuffle(seed=cfg.seed).repeat()
  encode = _EncodeDoc(tok, cfg.tfds_text_key)
  rows = []
  for r in range(first_row, first_row + local_batch):
    row_docs = docs[r::global_batch_size].map(encode).to_iter_dataset(_READ_IN_CALLER)
    rows.append(
        grain.experimental.ConcatThenSplitIterDataset(
            row_docs, length_struct={"tokens": seq_len + 1}
        )
    )
  return grain.experimental.ZipIterDataset(rows).map(_stack_rows)


def eval_stream(
    cfg: DataConfig, tok: tok_lib.Tokenizer, need_tokens: int | None, cache_dir: pathlib.Path
) -> np.ndarray:
  """Validation documents in order, packed into one token stream.

  Args:
    need_tokens: stop once this many tokens are read (a prefix, not cached); None: the whole
      split, cached next to the data (or under cache_dir) for the next run.
  """
  prepared = _prepared(cfg, cfg.tfds_eval_split)
  cache = tfds_source.moe_cache_dir(prepared, cache_dir)
  path = cache / (
      f"stream-{_tag(cfg.tfds_eval_split)}-{_tag(cfg.tfds_text_key)}"
      f"-{tok.fingerprint}-{prepared.fingerprint}.npy"
  )
  if path.exists():
    return corpora.load_stream(path)
  src = tfds_source.open_split(prepared, cfg.tfds_eval_split)
  chunks, total = [], 0
  for start in range(0, len(src), 1024):
    exs = _getitems(src, range(start, min(start + 1024, len(src))))
    chunks.append(tok.encode_documents(_text(e, cfg.tfds_text_key) for e in exs))
    total += len(chunks[-1])
    if need_tokens is not None and total >= need_tokens:
      return np.concatenate(chunks)
  stream = np.concatenate(chunks) if chunks else np.zeros(0, tok_lib.stream_dtype(tok.vocab_size))
  corpora.save_stream(path, stream)
  return stream


def describe(cfg: DataConfig) -> str:
  """The dataset and its train/eval split sizes in documents, for `pipeline.describe`."""
  prepared = _prepared(cfg, cfg.tfds_train_split)

  def docs(split):
    base = [s.split("[")[0] for s in split.split("+")]
    if all(b in prepared.split_lengths for b in base):
      if "[" in split:
        return f"{split}: {len(tfds_source.open_split(prepared, split)):,} docs"
      return f"{split}: {sum(prepared.split_lengths[b] for b in base):,} docs"
    return f"{split}: missing"

  return (
      f"tfds {prepared.name} ({prepared.data_dir}): "
      f"{docs(cfg.tfds_train_split)}, {docs(cfg.tfds_eval_split)}"
  )
