"""`moe.atomic_file.atomic_write`: a file is replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from moe import atomic_file


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
