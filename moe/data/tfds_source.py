"""TFDS text datasets prepared as array_record, read without TensorFlow.

Reading: `tfds.data_source(name, split=..., data_dir=..., download=False)`
gives random access to array_record shards with no TensorFlow. Offline, any
attempt to download would hang for minutes, so `locate_prepared` first checks
the files on disk (dataset_info.json, file format, split, shard files) and
raises `DatasetNotPreparedError` within milliseconds, with the command that
prepares the dataset. Only then is TFDS called, always with download=False.

Writing your own text: `build_text_files_dataset` (or
`python -m experiments.prepare_text_dataset --name=NAME --train=GLOB ... --data_dir=DIR`)
turns text files into the TFDS dataset `text_files/NAME`, one document per file
(default) or per non-empty line (`doc_per='line'`), features
{'text': Text, 'id': Text}, splits 'train' and 'validation'. It uses TFDS's own
`GeneratorBasedBuilder.download_and_prepare(file_format='array_record')`, which
works without TensorFlow installed (checked with tensorflow-datasets 4.9.10):
records are serialized by TFDS's numpy/protobuf example serializer, and the
layout (`text_files/NAME/1.0.0/{dataset_info.json, features.json,
text_files-train.array_record-00000-of-00001, ...}`) is exactly what
`tfds.data_source` reads back (as an unregistered builder, from the files).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import glob
import hashlib
import logging
import os
import pathlib
import re
import shutil

TEXT_FILES = "text_files"
TEXT_FILES_VERSION = "1.0.0"
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_DOC_PER = ("file", "line")


class DatasetNotPreparedError(FileNotFoundError):
  """The dataset is not (or not usably) prepared in the data directory."""


def default_data_dir() -> pathlib.Path:
  """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return pathlib.Path(
      os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))
  )


def parse_name(name: str) -> tuple[str, str | None, str | None]:
  """'c4/en:3.1.0' -> ('c4', 'en', '3.1.0'); 'lm1b' -> ('lm1b', None, None)."""
  version = None
  if ":" in name:
    name, version = name.rsplit(":", 1)
  parts = name.strip("/").split("/")
  if len(parts) > 2 or not parts[0] or "=" in name:
    raise ValueError(f'data.tfds_name must be "name[/config][:version]", got {name!r}.')
  return parts[0], (parts[1] if len(parts) == 2 else None), version


def prepare_command(name: str, data_dir: str | os.PathLike) -> str:
  """The shell command that prepares `name` in `data_dir` as array_record."""
  base, config, _ = parse_name(name)
  if base == TEXT_FILES:
    return (
        f'python -m experiments.prepare_text_dataset --name={config or "NAME"} '
        f"--train='/path/to/train/*.txt' "
        f"[--validation='/path/to/valid/*.txt'] --data_dir={data_dir}"
        "  (or moe.data.build_text_files_dataset(...) from Python)"
    )
  return f"tfds build {name} --data_dir={data_dir} " "--file_format=array_record"


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A dataset found on disk, ready for `open_split`."""

  name: str  # Version pinned, as given to tfds.data_source: 'c4/en:3.1.0'.
  data_dir: pathlib.Path
  version_dir: pathlib.Path
  split_lengths: dict[str, int]  # split -> number of examples
  fingerprint: str  # hash of dataset_info.json: changes when rebuilt


def _split_bases(split: str) -> list[str]:
  """'train[:90%]+validation' -> ['train', 'validation']."""
  return [s.split("[")[0].strip() for s in split.split("+")]


def locate_prepared(
    name: str, data_dir: str | os.PathLike | None, splits: Sequence[str] = ()
) -> PreparedDataset:
  """Finds `name` prepared as array_record in `data_dir`, or fails fast.

  Only looks at local files: never builds, downloads or contacts a server.

  Args:
    name: 'name[/config][:version]'; without a version, the highest version
      on disk is used.
    data_dir: TFDS data directory; None for `default_data_dir()`.
    splits: split specs that must exist (TFDS syntax, slices allowed).

  Raises:
    DatasetNotPreparedError: with the command to prepare the dataset.
  """
  data_dir = pathlib.Path(data_dir) if data_dir else default_data_dir()
  base, config, version = parse_name(name)
  unversioned = base if config is None else f"{base}/{config}"
  how = "Prepare it once (the preparation may need internet) with:\n  " + prepare_command(
      unversioned, data_dir
  )
  version_dir = _version_dir(name, data_dir, how)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Reads dataset_info.json and features.json only: no builder code, no download.
  try:
    info = tfds.builder_from_directory(os.fspath(version_dir)).info
  except Exception as error:  # pylint: disable=broad-except  # TFDS raises several kinds.
    raise DatasetNotPreparedError(
        f"{version_dir / 'dataset_info.json'} cannot be read as a TFDS dataset ({error}). {how}"
    ) from error
  formats = [info.file_format] + list(info.alternative_file_formats)
  if tfds.core.FileFormat.ARRAY_RECORD not in formats:
    raise DatasetNotPreparedError(
        f"TFDS dataset '{name}' in {version_dir} is stored as {[f.value for f in formats]}, but "
        "random access without TensorFlow needs array_record. Rebuild it:\n  "
        + prepare_command(unversioned, data_dir)
    )
  _check_splits(name, version_dir, info.splits, splits, how)
  info_text = (version_dir / "dataset_info.json").read_bytes()
  return PreparedDataset(
      name=f"{unversioned}:{version_dir.name}",
      data_dir=data_dir,
      version_dir=version_dir,
      split_lengths={split: info.splits[split].num_examples for split in info.splits},
      fingerprint=hashlib.sha1(info_text).hexdigest()[:16],
  )


def _version_dir(name: str, data_dir: pathlib.Path, how: str) -> pathlib.Path:
  """The directory of `name`'s version (the highest on disk when none is named) holding a
  dataset_info.json; else DatasetNotPreparedError, naming the configs present when none was given.
  """
  base, config, version = parse_name(name)
  ds_dir = data_dir / base / config if config else data_dir / base
  if version:
    candidates = [ds_dir / version]
  else:
    found = ds_dir.iterdir() if ds_dir.is_dir() else []
    candidates = sorted(
        (p for p in found if _VERSION_RE.match(p.name)),
        key=lambda p: tuple(int(x) for x in p.name.split(".")),
        reverse=True,
    )
  candidates = [p for p in candidates if (p / "dataset_info.json").is_file()]
  if candidates:
    return candidates[0]
  hint = ""
  if config is None and ds_dir.is_dir():
    configs = sorted(
        p.name for p in ds_dir.iterdir() if p.is_dir() and not _VERSION_RE.match(p.name)
    )
    if configs:
      hint = f"\nConfigs present under {ds_dir}: {configs}; name one, e.g. '{base}/{configs[0]}'."
  raise DatasetNotPreparedError(
      f"TFDS dataset '{name}' is not prepared in {data_dir} (no "
      f"{ds_dir}/<version>/dataset_info.json).{hint}\n{how}"
  )


def _check_splits(name: str, version_dir: pathlib.Path, prepared_splits, splits, how: str) -> None:
  """Every split that `splits` names is in the dataset's info and has its shard files on disk."""
  for spec in splits:
    for split in _split_bases(spec):
      if split not in prepared_splits:
        raise DatasetNotPreparedError(
            f"Split '{split}' (from '{spec}') is not in TFDS dataset '{name}' "
            f"at {version_dir}; available splits: {sorted(prepared_splits)}."
        )
      shards = [version_dir / f for f in prepared_splits[split].filenames]
      if not shards or not all(f.is_file() for f in shards):
        raise DatasetNotPreparedError(
            f"Missing array_record shards for split '{split}' in {version_dir}; "
            f"the preparation looks incomplete. {how}"
        )


def open_split(prepared: PreparedDataset, split: str) -> Sequence[dict]:
  """Random-access source of the examples of `split` (dicts of numpy/bytes)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(
        prepared.name, split=split, data_dir=os.fspath(prepared.data_dir), download=False
    )
  except Exception as e:  # pylint: disable=broad-except
    # A registered builder whose code version differs from the version on
    # disk refuses to load; the generic reader only needs the files.
    logging.warning(
        "tfds.data_source(%s) failed (%s); reading %s directly.",
        prepared.name,
        e,
        prepared.version_dir,
    )
    builder = tfds.builder_from_directory(os.fspath(prepared.version_dir))
    return builder.as_data_source(split=split)


def moe_cache_dir(prepared: PreparedDataset, fallback: pathlib.Path) -> pathlib.Path:
  """Where tokenizers / eval streams of this dataset are cached.

  Next to the data (`<version_dir>/moe_cache`) so every host sharing the data
  directory reuses them; `fallback` if that directory is read-only.
  """
  d = prepared.version_dir / "moe_cache"
  try:
    d.mkdir(exist_ok=True)
    if os.access(d, os.W_OK):
      return d
  except OSError:
    pass
  safe = re.sub(r"[^A-Za-z0-9_.-]", "_", prepared.name)
  return fallback / "tfds" / f"{safe}-{prepared.fingerprint}"


# ------------------------------------------------------------ text_files builder
def _is_validation(key: str, fraction: float) -> bool:
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _expand(patterns: Sequence[str | os.PathLike] | str) -> list[pathlib.Path]:
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  files: set[pathlib.Path] = set()
  for pat in patterns:
    matches = glob.glob(os.fspath(pat), recursive=True)
    if not matches:
      raise FileNotFoundError(f"No file matches {os.fspath(pat)!r}.")
    files.update(pathlib.Path(m).resolve() for m in matches if os.path.isfile(m))
  return sorted(files)


@functools.cache
def _text_files_builder_cls():
  """Defined lazily so that importing moe.data does not import TFDS."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # skip_registration: the builder's inputs are constructor arguments, so it
  # cannot be rebuilt by name; reading goes through the generic file reader.
  class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Plain text files, one document per file or per non-empty line."""

    VERSION = tfds.core.Version(TEXT_FILES_VERSION)
    RELEASE_NOTES = {TEXT_FILES_VERSION: "Initial release."}

    def __init__(self, *, examples: dict[str, list], **kwargs):
      self._examples = examples  # split -> [(key, path, line_no or None)]
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="User text files (moe.data.build_text_files_dataset).",
          features=tfds.features.FeaturesDict(
              {
                  "text": tfds.features.Text(),
                  "id": tfds.features.Text(),
              }
          ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {s: self._generate_examples(items) for s, items in self._examples.items()}

    def _generate_examples(self, items):
      for key, path, line_no in items:
        if line_no is None:
          text = pathlib.Path(path).read_bytes().decode("utf-8", "replace")
        else:
          text = _read_line(path, line_no)
        yield key, {"text": text, "id": key}

  return TextFiles


@functools.lru_cache(maxsize=4)
def _file_lines(path: str) -> tuple[str, ...]:
  return tuple(pathlib.Path(path).read_bytes().decode("utf-8", "replace").split("\n"))


def _read_line(path: str, line_no: int) -> str:
  return _file_lines(path)[line_no]


def _text_file_examples(
    tfds_name: str,
    train: list[pathlib.Path],
    valid: list[pathlib.Path] | None,
    doc_per: str,
    validation_fraction: float,
) -> dict[str, list]:
  """The documents of each split as (key, path, line index or None). Keys are paths relative to the
  files' common parent (plus ':<line>' per line): without `valid`, the sha1 of the key picks the
  validation documents, the same on every machine."""
  root = pathlib.Path(os.path.commonpath([p.parent for p in train + (valid or [])]))
  examples: dict[str, list] = {"train": [], "validation": []}

  def add(paths, split):
    for p in paths:
      rel = p.relative_to(root).as_posix()
      if doc_per == "file":
        keys = [(rel, None)]
      else:
        keys = [
            (f"{rel}:{i + 1}", i)
            for i, line in enumerate(_file_lines(os.fspath(p)))
            if line.strip()
        ]
      for key, line_no in keys:
        s = split or ("validation" if _is_validation(key, validation_fraction) else "train")
        examples[s].append((key, os.fspath(p), line_no))

  add(train, "train" if valid is not None else None)
  add(valid or [], "validation")
  for split, items in examples.items():
    if not items:
      raise ValueError(
          f"Split '{split}' of {tfds_name} would be empty; pass "
          "validation_files or a larger validation_fraction / more files."
      )
  return examples


def build_text_files_dataset(
    name: str,
    *,
    train_files: Sequence[str | os.PathLike] | str,
    validation_files: Sequence[str | os.PathLike] | str | None = None,
    data_dir: str | os.PathLike | None = None,
    doc_per: str = "file",
    validation_fraction: float = 0.05,
    overwrite: bool = False,
) -> str:
  """Writes text files as the array_record TFDS dataset `text_files/<name>`.

  Args:
    name: dataset config name, [a-z0-9_]+ (e.g. 'my_corpus').
    train_files: paths or glob patterns (recursive '**' allowed).
    validation_files: paths/globs for 'validation'. If None, documents are split
      by sha1 of their id (path relative to the common parent of the files,
      plus ':<line>' with doc_per='line'): stable across machines.
    data_dir: TFDS data directory; None for `default_data_dir()`.
    doc_per: 'file' (a whole file is a document) or 'line' (each non-empty
      line is a document, like lm1b).
    validation_fraction: held-out fraction when validation_files is None.
    overwrite: rebuild even if the dataset already exists.

  Returns:
    The name to put in `DataConfig.tfds_name`: 'text_files/<name>'.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not _NAME_RE.match(name):
    raise ValueError(f"name must match {_NAME_RE.pattern}, got {name!r}.")
  if doc_per not in _DOC_PER:
    raise ValueError(f"doc_per must be one of {list(_DOC_PER)}, got {doc_per!r}.")
  if validation_files is None and not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got " f"{validation_fraction}.")
  data_dir = pathlib.Path(data_dir) if data_dir else default_data_dir()
  tfds_name = f"{TEXT_FILES}/{name}"
  version_dir = data_dir / TEXT_FILES / name / TEXT_FILES_VERSION
  if (version_dir / "dataset_info.json").is_file() and not overwrite:
    return tfds_name

  examples = _text_file_examples(
      tfds_name,
      _expand(train_files),
      _expand(validation_files) if validation_files is not None else None,
      doc_per,
      validation_fraction,
  )
  builder = _text_files_builder_cls()(
      examples=examples,
      config=tfds.core.BuilderConfig(name=name),
      data_dir=os.fspath(data_dir),
      file_format="array_record",
  )
  mode = (
      tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
      if overwrite
      else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False, download_mode=mode)
  )
  if overwrite:  # Tokenizers/streams cached from the old content are stale.
    shutil.rmtree(version_dir / "moe_cache", ignore_errors=True)
  return tfds_name
