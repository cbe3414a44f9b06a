"""Where data files are looked for: the data folder, the cache folder and the search for a file.

``data_dir`` (argument), else ``$LSGEO_DATA_DIR``, else ``./data`` holds the image data sets, each
looked for in ``<data_dir>/<name>/`` (a few customary folder names) and in ``<data_dir>`` itself;
downloads go to ``<data_dir>/<name>/``. Generated data (MNIST-1D) is cached in ``cache_dir``, else
``$LSGEO_CACHE_DIR``, else ``~/.cache/lsgeo``.

Example:
  >>> from lsgeo.data import default_data_dir
  >>> str(default_data_dir("/tmp/my-data"))
  '/tmp/my-data'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["candidate_dirs", "default_cache_dir", "default_data_dir", "find_file", "missing_file_error"]


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$LSGEO_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("LSGEO_DATA_DIR", "data")).expanduser()


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LSGEO_CACHE_DIR``, else ``~/.cache/lsgeo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LSGEO_CACHE_DIR", "~/.cache/lsgeo")).expanduser()


def candidate_dirs(data_dir, subdirs: Sequence[str]) -> list[Path]:
    """``<root>/<s>`` for each of ``subdirs``, then ``<root>``, with ``root = default_data_dir(data_dir)``.
    The first one is where downloads go."""
    root = default_data_dir(data_dir)
    return [root / s for s in subdirs] + [root]


def find_file(names: Sequence[str], dirs: Sequence[Path]) -> Path | None:
    """The first existing ``dir / name`` (folders in order, then names in order), else None."""
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def missing_file_error(names: Sequence[str], dirs: Sequence[Path], *, dataset: str, url: str) -> FileNotFoundError:
    """The error for a file not found: names the file, every folder searched and how to obtain it."""
    return FileNotFoundError(
        f"{dataset}: file {names[0]!r} not found; looked in: {', '.join(str(d) for d in dirs)}. "
        f"Pass download=True to load_dataset (--download in the experiments) to fetch it from {url}, "
        f"or download it by hand into one of these folders (or point data_dir / $LSGEO_DATA_DIR at the "
        f"folder holding it)."
    )
