"""Writes your own text files as the TFDS dataset text_files/NAME (array_record), for training.

    python -m experiments.prepare_text_dataset --name=my_corpus --train='/data/train/**/*.txt' \
        [--validation='/data/valid/*.txt'] [--doc_per=line] --data_dir=/data/tfds
    python -m experiments.train --config=configs/switch.py:size=tiny \
        --config.data.source=tfds --config.data.tfds_name=text_files/my_corpus \
        --config.data.tfds_data_dir=/data/tfds --config.data.tokenizer=sentencepiece ...

One document per file (default) or per non-empty line; without --validation, a hash of each
document's path picks the held-out share (`moe.data.tfds_source.build_text_files_dataset`).
"""

from __future__ import annotations

import sys

from absl import app, flags

from moe.data import tfds_source

_NAME = flags.DEFINE_string("name", None, "Dataset config name, [a-z0-9_]+.")
_TRAIN = flags.DEFINE_multi_string("train", None, "Training files or globs (repeatable).")
_VALIDATION = flags.DEFINE_multi_string(
    "validation", None, "Validation files or globs (repeatable); default: a hash split."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's).")
_DOC_PER = flags.DEFINE_enum("doc_per", "file", ["file", "line"], "What one document is.")
_FRACTION = flags.DEFINE_float(
    "validation_fraction", 0.05, "Held-out share without --validation.", lower_bound=0.0
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset exists.")
flags.mark_flags_as_required(["name", "train"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    name = tfds_source.build_text_files_dataset(
        _NAME.value,
        train_files=_TRAIN.value,
        validation_files=_VALIDATION.value,
        data_dir=_DATA_DIR.value,
        doc_per=_DOC_PER.value,
        validation_fraction=_FRACTION.value,
        overwrite=_OVERWRITE.value,
    )
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"experiments.prepare_text_dataset: {error}")
  print(f"Prepared {name} in {_DATA_DIR.value or tfds_source.default_data_dir()}")


if __name__ == "__main__":
  app.run(main)
