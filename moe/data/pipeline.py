"""Grain pipelines: packed LM batches, per-process slicing, eval batches.

Every batch is a dict of numpy arrays, local_batch = global_batch_size //
process_count rows:
  'inputs':  int32   [local_batch, seq_len]
  'targets': int32   [local_batch, seq_len]  (inputs shifted by one token)
  'weights': float32 [local_batch, seq_len]  (0 only on eval padding rows)

Multi-host contract: global batch i is the same rows in the same order for any
process_count; process p gets rows [p*local_batch, (p+1)*local_batch) of it and
reads only the data of those rows.

* Built-in corpora (one token stream per split, see `corpora`): window k is
  stream[k*seq_len : k*seq_len + seq_len + 1], so every token is a target once
  per epoch. Window ids are reshuffled every epoch (from cfg.seed and the
  epoch), cut into local batches, and process p takes every P-th local batch
  from p: `grain.MapDataset.range(...)[p::P]`. A batch is then one numpy gather
  of [local_batch, seq_len+1] tokens (~0.05 ms for 64 x 256).
* TFDS (documents read lazily, too many to tokenise up front): row r of every
  global batch is its own packed stream over documents r, r+G, r+2G, ... of the
  per-epoch shuffled document order (`tfds_pipeline`), so the contract holds.

`train_iterator` returns a grain `DatasetIterator`; `get_state()/set_state()`
round-trip, and it checkpoints with orbax through
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)`
(handler `grain.checkpoint.CheckpointHandler`).
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence
import math
import pathlib
import weakref

import grain
import numpy as np

from moe.config.data import DataConfig, Source, TokenizerKind
from moe.data import corpora, tfds_pipeline, tokenizers as tok_lib

Batch = dict[str, np.ndarray]
# In-memory work: threads would only fight over the GIL (grain's advice).
_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_TFDS_DEFAULT_PREFETCH = 2
_INFINITE = 1 << 62  # "Forever" in batches, still a valid range().


def _cache_dir(cfg: DataConfig) -> pathlib.Path:
  return pathlib.Path(cfg.cache_dir) if cfg.cache_dir else corpora.default_cache_dir()


def _check_batching(
    seq_len: int, global_batch_size: int, process_index: int, process_count: int
) -> int:
  """Validates the batching arguments; returns local_batch."""
  for name, v, lo in (
      ("seq_len", seq_len, 1),
      ("global_batch_size", global_batch_size, 1),
      ("process_count", process_count, 1),
  ):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      raise ValueError(f"{name} must be an int >= {lo}, got {v!r}.")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got " f"{process_index!r}.")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size ({global_batch_size}) must be divisible by "
        f"process_count ({process_count})."
    )
  return global_batch_size // process_count


def _make_batch(rows: np.ndarray, weights: np.ndarray | None = None) -> Batch:
  """[b, seq_len+1] token windows -> inputs/targets/weights."""
  inputs = np.ascontiguousarray(rows[:, :-1], dtype=np.int32)
  targets = np.ascontiguousarray(rows[:, 1:], dtype=np.int32)
  if weights is None:
    weights = np.ones(inputs.shape, np.float32)
  return {"inputs": inputs, "targets": targets, "weights": weights}


# ------------------------------------------------------------- tokenizers
def tokenizer_for(cfg: DataConfig) -> tok_lib.Tokenizer:
  """The tokenizer of `cfg` (trains and caches a SentencePiece model at first use).

  BYTE: `ByteTokenizer` (vocab 258). SENTENCEPIECE: trained on at most
  cfg.sp_train_bytes of the training split; cached under cfg.cache_dir for the
  built-in corpora and next to the prepared TFDS dataset otherwise.
  """
  if cfg.tokenizer == TokenizerKind.BYTE:
    return tok_lib.ByteTokenizer()
  if cfg.source == Source.TFDS:
    return tfds_pipeline.tokenizer(cfg, _cache_dir(cfg))
  return corpora.corpus_sentencepiece(
      cfg.source, _cache_dir(cfg), vocab_size=cfg.sp_vocab_size, max_bytes=cfg.sp_train_bytes
  )


def vocab_size(cfg: DataConfig) -> int:
  """Number of token ids (the model's embedding size must be >= this)."""
  return tokenizer_for(cfg).vocab_size


# ---------------------------------------------------------------- streams
def token_stream(cfg: DataConfig, split: str) -> np.ndarray:
  """Packed token stream of a built-in corpus split ('train'/'validation')."""
  if cfg.source == Source.TFDS:
    raise ValueError(
        "token_stream is for the built-in corpora; TFDS documents "
        "are packed lazily by train_iterator."
    )
  return corpora.corpus_stream(cfg.source, split, tokenizer_for(cfg), _cache_dir(cfg))


def _num_windows(stream: np.ndarray, seq_len: int, what: str) -> int:
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ValueError(
        f"The {what} stream has {len(stream)} tokens: fewer than " f"seq_len + 1 = {seq_len + 1}."
    )
  return n


class _GatherWindows:
  """Window ids [b] -> batch; one vectorised gather, no per-token Python."""

  def __init__(self, stream: np.ndarray, seq_len: int):
    self._stream = stream
    self._seq_len = seq_len
    self._offsets = np.arange(seq_len + 1, dtype=np.int64)

  def __call__(self, window_ids) -> Batch:
    starts = np.asarray(window_ids, dtype=np.int64) * self._seq_len
    return _make_batch(self._stream[starts[:, None] + self._offsets])


class _ShuffledWindowIds:
  """Local batch j -> the window ids of rows [j*lb, (j+1)*lb) of the stream of
  window ids "epoch 0 shuffled, epoch 1 shuffled, ...".

  Vectorised instead of grain's per-index `MapDataset.shuffle` (which costs
  ~7 us per row in Python, ~0.45 ms per 64-row batch): one permutation per
  epoch, from a stable bit generator (PCG64 raw bits via SeedSequence, both
  fixed across numpy versions, unlike Generator.permutation), so a restored
  checkpoint sees the same order after a numpy upgrade.
  """

  def __init__(self, n_windows: int, seed: int, local_batch: int):
    self._n, self._seed, self._lb = n_windows, seed, local_batch
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      bits = np.random.PCG64(np.random.SeedSequence([self._seed, epoch]))
      perm = np.argsort(bits.random_raw(self._n), kind="stable")
      # Keep the current and next epoch only (a batch may straddle them).
      self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
      self._perms[epoch] = perm
    return perm

  def __call__(self, j: int) -> np.ndarray:
    epoch, idx = np.divmod(j * self._lb + np.arange(self._lb), self._n)
    out = np.empty(self._lb, np.int64)
    for e in np.unique(epoch):
      m = epoch == e
      out[m] = self._perm(int(e))[idx[m]]
    return out


def _stream_train_dataset(
    stream: np.ndarray,
    seq_len: int,
    seed: int,
    process_index: int,
    process_count: int,
    local_batch: int,
) -> grain.IterDataset:
  n = _num_windows(stream, seq_len, "training")
  # Local batch j holds rows [j*lb, (j+1)*lb) of the shuffled window order:
  # global batch i is local batches i*P .. i*P+P-1, so process p's share of it
  # is local batch i*P+p, i.e. local_batches[p::P] (and p computes only it).
  local_batches = grain.MapDataset.range(_INFINITE)[process_index::process_count]
  gather = _GatherWindows(stream, seq_len)
  window_ids = _ShuffledWindowIds(n, seed, local_batch)
  return local_batches.map(lambda j: gather(window_ids(j))).to_iter_dataset(_NO_THREADS)


# ------------------------------------------------------------- public API
def train_iterator(
    cfg: DataConfig,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int | None = None,
) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator over training batches.

  Args:
    cfg: what data and tokenizer.
    seq_len: tokens per row; rows are windows of seq_len + 1 tokens.
    global_batch_size: rows per step over all processes.
    process_index: this process, in [0, process_count) (jax.process_index()).
    process_count: number of processes (jax.process_count()); must divide
      global_batch_size.
    prefetch: batches computed ahead in a background thread (state stays
      exact). None: 0 for the in-memory corpora (a batch costs microseconds),
      2 for TFDS (tokenisation happens here).

  Returns:
    A grain `DatasetIterator` of dicts 'inputs'/'targets' int32 and 'weights'
    float32 (all ones), each [global_batch_size // process_count, seq_len];
    rows [p*lb, (p+1)*lb) of global batch i, independent of process_count.
    Epochs repeat forever, reshuffled deterministically from cfg.seed.
  """
  local_batch = _check_batching(seq_len, global_batch_size, process_index, process_count)
  tok = tokenizer_for(cfg)
  if cfg.source == Source.TFDS:
    windows = tfds_pipeline.train_windows(
        cfg,
        tok,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        first_row=process_index * local_batch,
        local_batch=local_batch,
    )
    ds = windows.map(_make_batch)
    prefetch = _TFDS_DEFAULT_PREFETCH if prefetch is None else prefetch
  else:
    ds = _stream_train_dataset(
        token_stream(cfg, corpora.TRAIN),
        seq_len,
        cfg.seed,
        process_index,
        process_count,
        local_batch,
    )
    prefetch = prefetch or 0
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  it = iter(ds)
  if prefetch:
    _PREFETCHING.add(it)
  return it


# Prefetch threads still running at interpreter exit make grain's __del__ fail
# noisily during module teardown; atexit runs before it, so close them here.
_PREFETCHING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_prefetching() -> None:
  for it in list(_PREFETCHING):
    it.close()


def trained_window_ids(cfg: DataConfig, *, seq_len: int, global_batch_size: int, steps: int):
  """The training stream's windows that `steps` steps of `train_iterator` drew (sorted, unique).

  Step i draws rows [i G, (i + 1) G) of the window order "epoch 0 shuffled, epoch 1 shuffled,
  ...", whatever the number of processes; so the first `steps` steps drew its first steps x G rows.
  """
  if cfg.source == Source.TFDS:
    raise ValueError("trained_window_ids is for the built-in corpora (data.source), not TFDS")
  n = _num_windows(token_stream(cfg, corpora.TRAIN), seq_len, "training")
  rows = steps * global_batch_size
  if rows >= n:  # A whole epoch: every window.
    return np.arange(n, dtype=np.int64)
  first_epoch = _ShuffledWindowIds(n, cfg.seed, local_batch=n)(0)
  return np.sort(first_epoch[:rows])


def spread_window_ids(n_windows: int, count: int) -> np.ndarray:
  """`count` window ids spread evenly over `n_windows`: floor((i + 1/2) * n / count), increasing.

  Every stretch of the stream holds its share of the ids, so each document is scored in proportion
  to its length; `count >= n_windows` gives every window once.
  """
  if count >= n_windows:
    return np.arange(n_windows, dtype=np.int64)
  return ((np.arange(count, dtype=np.float64) + 0.5) * (n_windows / count)).astype(np.int64)


class EvalBatches(Sequence):
  """Finite, deterministic eval batches; re-iterable (build once, reuse).

  The scored windows (window k = stream[k*seq_len : k*seq_len + seq_len + 1], seq_len targets
  each) are `window_ids`: all of the validation stream's windows, or `num_batches * G` of them
  spread evenly over it (`spread_window_ids`), or its first `num_batches * G` (`spread=False`).
  Global batch i holds ids [i*G, (i+1)*G) of them, in stream order; no token is a target twice.
  A last global batch with fewer ids is padded with rows of pad ids and weight 0; every process
  sees the same number of batches.
  """

  def __init__(
      self,
      stream: np.ndarray,
      *,
      seq_len: int,
      global_batch_size: int,
      num_batches: int | None,
      process_index: int,
      local_batch: int,
      pad_id: int,
      spread: bool = True,
  ):
    self._stream = stream
    self._n_windows = _num_windows(stream, seq_len, "validation")
    wanted = self._n_windows if num_batches is None else num_batches * global_batch_size
    if spread:
      self._ids = spread_window_ids(self._n_windows, wanted)
    else:
      self._ids = np.arange(min(wanted, self._n_windows), dtype=np.int64)
    self._len = math.ceil(len(self._ids) / global_batch_size)
    self._gather = _GatherWindows(stream, seq_len)
    self._seq_len = seq_len
    self._global, self._local = global_batch_size, local_batch
    self._first_row = process_index * local_batch
    self._pad_id = pad_id

  @property
  def num_windows(self) -> int:
    """Windows (seq_len targets each) in the whole validation stream."""
    return self._n_windows

  @property
  def stream(self) -> np.ndarray:
    """The validation token stream the windows are cut from."""
    return self._stream

  @property
  def window_ids(self) -> np.ndarray:
    """The scored windows of the stream, in the order the batches hold them."""
    return self._ids

  @property
  def num_targets(self) -> int:
    """Tokens scored by one pass over the batches (every process's rows together)."""
    return len(self._ids) * self._seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._len))]
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"eval batch {i} out of range [0, {self._len}).")
    rows = i * self._global + self._first_row + np.arange(self._local)
    valid = rows < len(self._ids)
    batch = self._gather(self._ids[np.where(valid, rows, 0)])
    if not valid.all():
      for k in ("inputs", "targets"):
        batch[k][~valid] = self._pad_id
      batch["weights"][~valid] = 0.0
    return batch


def eval_batches(
    cfg: DataConfig,
    *,
    seq_len: int,
    global_batch_size: int,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    spread: bool = True,
    split: str = corpora.VALIDATION,
) -> EvalBatches:
  """Deterministic, finite batches of the validation split (or, to compare, of the training split).

  Args:
    cfg: what data and tokenizer (validation split: the held-out works/files,
      or cfg.tfds_eval_split).
    seq_len: tokens per row.
    global_batch_size: rows per batch over all processes.
    num_batches: this many batches (None: the whole split; fewer when the split
      is smaller).
    process_index: this process, in [0, process_count).
    process_count: number of processes; must divide global_batch_size.
    spread: the batches' windows spread evenly over the whole split (True), or
      its first windows (False). With TFDS, spread windows need the whole split
      tokenised, once, cached next to the data; a prefix tokenises only itself.
    split: 'validation', or 'train' for the built-in corpora: the same windows cut from the
      training stream (which of them a run trained on: `trained_window_ids`).

  Returns:
    `EvalBatches`, a Sequence of the same dicts as `train_iterator`
    ('inputs'/'targets' int32, 'weights' float32, [local_batch, seq_len]);
    same row slicing rule; 'weights' is 0 on padding rows of the last batch.
    Note: for TFDS every process reads the (prefix of the) split, eval only.
  """
  local_batch = _check_batching(seq_len, global_batch_size, process_index, process_count)
  if split not in (corpora.VALIDATION, corpora.TRAIN):
    raise ValueError(f"split={split!r} must be {corpora.VALIDATION!r} or {corpora.TRAIN!r}")
  if split == corpora.TRAIN and cfg.source == Source.TFDS:
    raise ValueError("split='train' is for the built-in corpora (data.source), not TFDS")
  if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
    raise ValueError(f"num_batches must be None or an int >= 1, got " f"{num_batches!r}.")
  tok = tokenizer_for(cfg)
  if cfg.source == Source.TFDS:
    prefix = num_batches is not None and not spread
    need = num_batches * global_batch_size * seq_len + 1 if prefix else None
    stream = tfds_pipeline.eval_stream(cfg, tok, need, _cache_dir(cfg))
  else:
    stream = token_stream(cfg, split)
  return EvalBatches(
      stream,
      seq_len=seq_len,
      global_batch_size=global_batch_size,
      num_batches=num_batches,
      process_index=process_index,
      local_batch=local_batch,
      pad_id=tok.pad_id,
      spread=spread,
  )


def describe(cfg: DataConfig) -> str:
  """One line for logs: source, tokenizer, vocab, train/validation sizes."""
  tok = tokenizer_for(cfg)
  tok_desc = f"{cfg.tokenizer.value} tokenizer (vocab {tok.vocab_size})"
  if cfg.source == Source.TFDS:
    return f"{tfds_pipeline.describe(cfg)}; {tok_desc}"
  parts = []
  for split in corpora.SPLITS:
    n_docs = len(corpora.corpus_documents(cfg.source, split))
    n_tok = len(token_stream(cfg, split))
    parts.append(f"{split} {n_tok / 1e6:.2f}M tokens ({n_docs} docs)")
  return f'{cfg.source.value}: {", ".join(parts)}; {tok_desc}'
