"""Files written whole or not at all, so a crash or a concurrent reader never sees half a file."""

from __future__ import annotations

import os
import pathlib
import tempfile


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to a temporary file in the same directory, syncs it, then renames it over `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as error:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
      # A failed write or fsync names no file; the one line a run stops with should.
      raise OSError(error.errno, error.strerror, str(path)) from error
    raise
