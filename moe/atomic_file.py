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
    if isinstance(error, OSError):
      raise naming(error, path)
    raise


def naming(error: OSError, path: str | os.PathLike) -> OSError:
  """`error`, naming `path` if it names no file: a failed write or fsync (EFBIG, ENOSPC) names none,
  and the one line a run stops with should say which file could not be written."""
  if error.errno is None or error.filename is not None:
    return error
  named = OSError(error.errno, error.strerror, os.fspath(path))
  named.__cause__ = error
  return named
