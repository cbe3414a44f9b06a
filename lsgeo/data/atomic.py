"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write.

The bytes go to a temporary file in the destination folder (``.<name>.<random>.tmp``), which is
flushed, fsync'ed and then renamed over the destination with ``os.replace`` (atomic on POSIX and
Windows within one file system). If anything fails before the rename (an exception in the body, a
checksum that does not match, Ctrl-C) the temporary file is deleted and the destination is untouched.
The new file gets the permissions an ordinary ``open(path, "w")`` would give it (``0o666 & ~umask``,
usually 0644), or keeps the mode of the file it replaces; never the owner-only 0600 of ``mkstemp``.

This is the project's one atomic-write helper: the MNIST-1D cache, the downloads and the
experiment runner's result files all go through ``atomic_writer``. Cost: one extra rename and an
fsync per file.

Example:
  >>> import pathlib, tempfile
  >>> from lsgeo.data import write_atomic
  >>> with tempfile.TemporaryDirectory() as d:
  ...     path = write_atomic(pathlib.Path(d) / "sub" / "note.txt", "hello")
  ...     print(path.read_text(), sorted(p.name for p in path.parent.iterdir()))
  hello ['note.txt']
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["atomic_writer", "savez_atomic", "write_atomic"]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Context manager yielding a binary file whose content replaces ``path`` atomically on exit.

    Parent folders are created. On a normal exit the temporary file is flushed, fsync'ed, given the
    permissions of an ordinary new file (or of the file it replaces) and renamed to ``path``; if the
    body raises, the temporary file is removed, ``path`` is left as it was and the exception
    propagates.

    Example:
      >>> import pathlib, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = pathlib.Path(d) / "out.bin"
      ...     with atomic_writer(path) as f:
      ...         _ = f.write(b"abc")
      ...     path.read_bytes()
      b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (``str`` is encoded as UTF-8) to ``path`` atomically; returns ``Path(path)``.

    Example:
      >>> import pathlib, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_atomic(pathlib.Path(d) / "a.json", '{"x": 1}').read_text()
      '{"x": 1}'
    """
    if not isinstance(data, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
    with atomic_writer(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def savez_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``np.savez(path, **arrays)`` written atomically (``path`` is used as given: no ``.npz`` is
    appended); returns ``Path(path)``.

    Example:
      >>> import pathlib, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = savez_atomic(pathlib.Path(d) / "cache.npz", x=np.arange(3))
      ...     with np.load(path) as f:
      ...         print(f["x"])
      [0 1 2]
    """
    with atomic_writer(path) as f:
        np.savez(f, **arrays)
    return Path(path)
