"""Fashion-MNIST (Xiao et al. 2017) from its four official IDX files, optionally downloaded.

The IDX format (LeCun's MNIST format): magic number 0x0000 <dtype byte> <ndim byte>, the ndim sizes
as big-endian uint32, then the row-major data; images (idx3) have magic 2051, labels (idx1) 2049.
Files are read gzipped (as distributed) or already gunzipped. Every read checks the magic number,
the number of dimensions, the payload size, that images and labels agree in number, and that the
labels are classes 0..9 (a ValueError names the file otherwise).

The official files are ``FASHION_MNIST_URL + name`` for the names in ``FASHION_MNIST_FILES``;
``FASHION_MNIST_SHA256`` holds their SHA-256 digests, the values listed by the ``mnists`` package
(C. Olding) and ``batchup`` (G. French) (torchvision lists only MD5s).

Example:
  >>> import gzip, pathlib, struct, tempfile
  >>> from lsgeo.data import read_idx
  >>> with tempfile.TemporaryDirectory() as d:
  ...     path = pathlib.Path(d) / "labels-idx1-ubyte.gz"
  ...     _ = path.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 0x08, 1, 3) + bytes([7, 0, 9])))
  ...     read_idx(path, expected_ndim=1).tolist()
  [7, 0, 9]
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from lsgeo.data.dataset import Dataset
from lsgeo.data.download import download_file, file_sha256, resolve_base_url
from lsgeo.data.paths import candidate_dirs, find_file, missing_file_error
from lsgeo.validation import check_class_labels

__all__ = [
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_PAGE",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_URL",
    "download_fashion_mnist",
    "fashion_mnist",
    "read_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # + file name
FASHION_MNIST_PAGE = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
    "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
    "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
    "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
}
_NUM_CLASSES = 10
_SUBDIRS = ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, *, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into an array of its stored dtype and shape.

    Raises ValueError naming the file when it cannot be read or the magic number, ``expected_ndim``
    or size is wrong. Cost: one read of the file (memory: the file, compressed and raw).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read the IDX file ({e}); re-download it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {'0x' + raw[:4].hex() if raw else '(empty file)'}; "
                         "expected 0x00000801 (labels) or 0x00000803 (images)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions (magic 0x{raw[:4].hex()}), "
                         f"expected {expected_ndim} (magic 0x{0x800 + expected_ndim:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != size:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, expected {size} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(name: str, dirs) -> Path | None:
    return find_file([name, name[: -len(".gz")]], dirs)


def read_fashion_mnist(folder: str | os.PathLike | None = None, *, data_dir=None):
    """Raw Fashion-MNIST arrays from the four official IDX files: ``(x_train [60000, 28, 28] uint8,
    y_train [60000] uint8, x_test [10000, 28, 28], y_test [10000])``.

    Files (``.gz``, or already gunzipped without the suffix) are looked for in ``folder`` if given,
    else in ``<data_dir>/fashion_mnist``, ``<data_dir>/fashion-mnist``, ``<data_dir>/FashionMNIST/raw``
    and ``<data_dir>``. A missing file is a FileNotFoundError naming it, the folders and the URL; a
    malformed file, or a label outside 0..9, a ValueError naming the file (and the bad values).
    """
    dirs = [Path(folder).expanduser()] if folder is not None else candidate_dirs(data_dir, _SUBDIRS)
    out = {}
    for key, name in FASHION_MNIST_FILES.items():
        path = _find(name, dirs)
        if path is None:
            raise missing_file_error([name], dirs, dataset="Fashion-MNIST",
                                     url=f"{FASHION_MNIST_URL}{name} (see {FASHION_MNIST_PAGE})")
        out[key] = read_idx(path, expected_ndim=3 if key.startswith("x") else 1)
        if key.startswith("y"):
            check_class_labels(out[key], _NUM_CLASSES, name=f"{path}: Fashion-MNIST labels")
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise ValueError(f"Fashion-MNIST {split}: {len(out[f'x_{split}'])} images but "
                             f"{len(out[f'y_{split}'])} labels in {FASHION_MNIST_FILES[f'y_{split}']}")
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"]


def download_fashion_mnist(data_dir=None, *, base_url: str | None = None, progress: bool = True) -> list[Path]:
    """Download the Fashion-MNIST files that ``read_fashion_mnist(data_dir=data_dir)`` does not find
    into ``<data_dir>/fashion_mnist/``, each verified against ``FASHION_MNIST_SHA256`` and written
    atomically (see ``lsgeo.data.download``). A ``.gz`` file already present is checked against its
    digest too and fetched again when it is corrupt (gunzipped files are read as they are). Returns
    the files downloaded (empty when all were there and intact). ``base_url``: a mirror (else
    ``$LSGEO_DATA_URL``, else ``FASHION_MNIST_URL``). Cost: 30 MB from the network.
    """
    dirs = candidate_dirs(data_dir, _SUBDIRS)
    todo = {}  # name -> where to write it
    for name in FASHION_MNIST_FILES.values():
        path = _find(name, dirs)
        if path is None:
            todo[name] = dirs[0] / name
        elif path.name == name and file_sha256(path) != FASHION_MNIST_SHA256[name]:
            todo[name] = path  # an official file found corrupt: fetched again, replaced only once verified
    if not todo:
        return []
    base = resolve_base_url(base_url, FASHION_MNIST_URL)
    return [download_file(base + name, path, FASHION_MNIST_SHA256[name], progress=progress)
            for name, path in todo.items()]


def fashion_mnist(*, data_dir=None, download: bool = False, base_url: str | None = None) -> Dataset:
    """Fashion-MNIST from the local IDX files: NHWC ``[n, 28, 28, 1]`` float32 in [0, 1], labels
    int32, 10 classes. With ``download=True`` missing files are first fetched
    (``download_fashion_mnist``). See ``read_fashion_mnist`` for where files are looked for."""
    if download:
        download_fashion_mnist(data_dir, base_url=base_url)
    xtr, ytr, xte, yte = read_fashion_mnist(data_dir=data_dir)
    f = lambda x: (x[..., None].astype(np.float32) / 255.0)
    return Dataset(f(xtr), ytr.astype(np.int32), f(xte), yte.astype(np.int32), 10)
