"""Data for the MoE language models: corpora, tokenizers, grain pipelines.

Typical use::

  from moe import data
  cfg = data.DataConfig(source='shakespeare', tokenizer='byte', seed=0)
  vocab = data.vocab_size(cfg)
  it = data.train_iterator(cfg, seq_len=256, global_batch_size=64,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  batch = next(it)  # {'inputs','targets': int32, 'weights': float32} [64/P, 256]
  evals = data.eval_batches(cfg, seq_len=256, global_batch_size=64)

Checkpoint the iterator with orbax: `grain.checkpoint.CheckpointSave(it)` /
`grain.checkpoint.CheckpointRestore(it)`, or `it.get_state()`/`it.set_state()`.
"""

from moe.config.data import DataConfig, Source, TokenizerKind
from moe.data.corpora import SHAKESPEARE_VALIDATION_WORKS
from moe.data.pipeline import describe, eval_batches, EvalBatches, token_stream, tokenizer_for, train_iterator, vocab_size
from moe.data.tfds_source import build_text_files_dataset, DatasetNotPreparedError
from moe.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = [
    "build_text_files_dataset",
    "ByteTokenizer",
    "DataConfig",
    "DatasetNotPreparedError",
    "describe",
    "eval_batches",
    "EvalBatches",
    "SentencePieceTokenizer",
    "SHAKESPEARE_VALIDATION_WORKS",
    "Source",
    "token_stream",
    "Tokenizer",
    "tokenizer_for",
    "train_iterator",
    "TokenizerKind",
    "vocab_size",
]
