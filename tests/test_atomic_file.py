"""`moe.atomic_file.atomic_write`: a file is replaced whole or not at all."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import pytest

from moe import atomic_file

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_writes_text_and_bytes_and_creates_the_directory(tmp_path):
  path = tmp_path / "a" / "b.json"
  atomic_file.atomic_write(path, "héllo")
  assert path.read_text(encoding="utf-8") == "héllo"
  atomic_file.atomic_write(path, b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  assert sorted(os.listdir(path.parent)) == ["b.json"]  # No temporary file left behind.


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  atomic_file.atomic_write(path, "old")

  def fail(*args):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="disk full"):
    atomic_file.atomic_write(path, "new")
  assert path.read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_a_write_past_the_file_size_limit_names_the_file_it_was_for(tmp_path):
  """A real EFBIG (RLIMIT_FSIZE in a child, as on a full disk): the error names the target."""
  path = tmp_path / "stream.npy"
  child = (
      "import resource, signal, sys\n"
      "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
      "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
      "from moe import atomic_file\n"
      "try:\n"
      "  atomic_file.atomic_write(sys.argv[1], bytes(1 << 17))\n"
      "except OSError as error:\n"
      "  print(error)\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", child, str(path)], cwd=REPO, capture_output=True, text=True, check=True
  )
  assert result.stdout.strip() == f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}: '{path}'"
  assert not os.listdir(tmp_path)  # Neither the file nor its temporary.
