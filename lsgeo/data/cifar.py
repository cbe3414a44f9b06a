"""CIFAR-10 (Krizhevsky 2009) from its official python version, optionally downloaded.

The archive ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/{data_batch_1..5, test_batch}``,
each a pickled dict with ``b"data"`` (uint8 ``[10000, 3072]``: the R, G and B planes of a 32x32
image, row-major) and ``b"labels"`` (10000 ints in 0..9). The batches are read from the extracted
folder or straight from the archive, without extracting it. Every read checks the shapes and that
the labels are classes 0..9 (a ValueError names the file otherwise). The batches are pickles: only
read files you downloaded from the official URL (``download_cifar10`` verifies the digest).

``CIFAR10_SHA256`` is the SHA-256 of the official archive as listed by Keras
(``keras.datasets.cifar10``, ``file_hash``); torchvision lists its MD5,
c58f30108f718f92721af3b95e74349a.

Example:
  >>> import tempfile
  >>> from lsgeo.data import read_cifar10
  >>> with tempfile.TemporaryDirectory() as d:
  ...     try:
  ...         read_cifar10(d)
  ...     except FileNotFoundError as e:
  ...         print(str(e)[:58])
  CIFAR-10 (folder 'cifar-10-batches-py' or archive): file '
"""

from __future__ import annotations

import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lsgeo.data.dataset import Dataset
from lsgeo.data.download import download_file, file_sha256, resolve_base_url
from lsgeo.data.paths import candidate_dirs, find_file, missing_file_error
from lsgeo.validation import check_class_labels

__all__ = ["CIFAR10_ARCHIVE", "CIFAR10_SHA256", "CIFAR10_URL", "cifar10", "download_cifar10", "read_cifar10"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
_NUM_CLASSES = 10
_SUBDIRS = ("cifar10", "cifar-10")


def _parse_cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.loads(blob, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"])
    except Exception as e:
        raise ValueError(f"{where}: not a CIFAR-10 python batch (a pickled dict with b'data' and "
                         f"b'labels'): {type(e).__name__}: {e}") from e
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{where}: expected data [n, 3072] and n labels, got data {data.shape} "
                         f"and labels of shape {labels.shape}")
    check_class_labels(labels, _NUM_CLASSES, name=f"{where}: CIFAR-10 labels")
    # rows are channel-major 3 x 32 x 32 (R, G, B planes): to NHWC
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _find_batches(dirs: Sequence[Path]) -> tuple[Path, Path] | None:
    """``(d, folder holding the batches)`` for the first candidate ``d`` with extracted batches."""
    for d in dirs:
        for batch_dir in (d / CIFAR10_FOLDER, d):
            if (batch_dir / CIFAR10_TEST_BATCH).is_file() or (batch_dir / "data_batch_1").is_file():
                return d, batch_dir
    return None


def read_cifar10(folder: str | os.PathLike | None = None, *, data_dir=None):
    """Raw CIFAR-10 arrays from the official python version: ``(x_train [50000, 32, 32, 3] uint8
    NHWC, y_train [50000] int32, x_test [10000, 32, 32, 3], y_test [10000])``.

    Reads ``cifar-10-batches-py/{data_batch_1..5, test_batch}`` if that folder exists (or the
    batches directly in ``folder``), else the archive ``cifar-10-python.tar.gz`` without extracting
    it. Looked for in ``folder`` if given, else ``<data_dir>/cifar10``, ``<data_dir>/cifar-10`` and
    ``<data_dir>``. A missing file is a FileNotFoundError naming it; a malformed batch, or a label
    outside 0..9, a ValueError naming the file (and the bad values).
    """
    dirs = [Path(folder).expanduser()] if folder is not None else candidate_dirs(data_dir, _SUBDIRS)
    names = CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
    found = _find_batches(dirs)
    if found is not None:
        d, batch_dir = found
        paths = [batch_dir / n for n in names]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(
                    f"CIFAR-10: file {p.name!r} not found in {batch_dir} (the other batches are "
                    f"there); download {CIFAR10_URL} again and extract it into {d}")
        blobs = {p.name: (p.read_bytes(), str(p)) for p in paths}
    else:
        archive = find_file([CIFAR10_ARCHIVE], dirs)
        if archive is None:
            raise missing_file_error([CIFAR10_ARCHIVE], dirs, url=CIFAR10_URL,
                                     dataset=f"CIFAR-10 (folder {CIFAR10_FOLDER!r} or archive)")
        blobs = _read_cifar_archive(archive, names)
    parsed = {n: _parse_cifar_batch(*blobs[n]) for n in names}
    x_train = np.concatenate([parsed[n][0] for n in CIFAR10_TRAIN_BATCHES])
    y_train = np.concatenate([parsed[n][1] for n in CIFAR10_TRAIN_BATCHES])
    return x_train, y_train, *parsed[CIFAR10_TEST_BATCH]


def _read_cifar_archive(archive: Path, names: Sequence[str]) -> dict[str, tuple[bytes, str]]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise ValueError(f"{archive}: archive lacks {missing}; re-download {CIFAR10_URL}")
            return {n: (tar.extractfile(members[n]).read(), f"{archive}:{members[n].name}") for n in names}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{archive}: cannot read the archive ({e}); re-download {CIFAR10_URL}") from e


def download_cifar10(data_dir=None, *, base_url: str | None = None, progress: bool = True) -> list[Path]:
    """Download ``cifar-10-python.tar.gz`` into ``<data_dir>/cifar10/`` unless ``read_cifar10(data_dir=
    data_dir)`` already finds the batches or the archive; verified against ``CIFAR10_SHA256`` and
    written atomically (see ``lsgeo.data.download``). An archive already present is checked against
    the digest and fetched again when corrupt (extracted batches are read as they are). Returns the
    files downloaded (empty when the data were there and intact). ``base_url``: a mirror (else ``$LSGEO_DATA_URL``,
    else the folder of ``CIFAR10_URL``). Cost: 170 MB from the network; the archive is read as is.
    """
    dirs = candidate_dirs(data_dir, _SUBDIRS)
    if _find_batches(dirs) is not None:
        return []
    archive = find_file([CIFAR10_ARCHIVE], dirs)
    if archive is not None and file_sha256(archive) == CIFAR10_SHA256:
        return []
    target = dirs[0] / CIFAR10_ARCHIVE if archive is None else archive  # a corrupt archive is fetched again
    base = resolve_base_url(base_url, CIFAR10_URL[: -len(CIFAR10_ARCHIVE)])
    return [download_file(base + CIFAR10_ARCHIVE, target, CIFAR10_SHA256, progress=progress)]


def cifar10(*, data_dir=None, download: bool = False, base_url: str | None = None) -> Dataset:
    """CIFAR-10 from the local python batches: NHWC ``[n, 32, 32, 3]`` float32 in [0, 1], labels
    int32, 10 classes. With ``download=True`` the archive is first fetched if absent
    (``download_cifar10``). See ``read_cifar10`` for where files are looked for."""
    if download:
        download_cifar10(data_dir, base_url=base_url)
    xtr, ytr, xte, yte = read_cifar10(data_dir=data_dir)
    f = lambda x: x.astype(np.float32) / 255.0
    return Dataset(f(xtr), ytr.astype(np.int32), f(xte), yte.astype(np.int32), 10)
