"""lsgeo.data downloads (against a loopback HTTP server) and atomic writes."""

import gzip
import hashlib
import http.server
import io
import os
import socket
import stat
import tarfile
import threading
import time

import numpy as np
import pytest

from lsgeo import data
from lsgeo.data import (
    DownloadError,
    atomic_writer,
    download_file,
    load_dataset,
    write_atomic,
)


class _Mirror:
    """Serves ``files`` (name -> bytes) on 127.0.0.1; names in ``truncate`` get a full Content-Length
    but only half of their bytes before the connection is closed."""

    def __init__(self):
        self.files, self.truncate, self.requests = {}, set(), []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                mirror.requests.append(name)
                body = mirror.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in mirror.truncate else body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def add(self, name: str, body: bytes) -> str:
        self.files[name] = body
        return hashlib.sha256(body).hexdigest()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror():
    m = _Mirror()
    yield m
    m.close()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# The published SHA-256 digests lsgeo.data checks downloads against, each with its source. The download tests
# serve synthetic files from a loopback mirror and replace these digests (monkeypatch) by the SHA-256 of the
# synthetic bytes (hashlib, computed by _Mirror.add); this test pins the published values themselves.
FASHION_MNIST_PUBLISHED_SHA256 = {
    # Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), files at http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/.
    # github.com/zalandoresearch/fashion-mnist publishes MD5s only; these SHA-256 digests of the same four files
    # are the ones recorded in Britefury/batchup, batchup/datasets/fashion_mnist.py (_SHA256_TRAIN_IMAGES, ...).
    "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
    "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
    "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
    "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
}
# CIFAR-10, https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (its page lists the MD5
# c58f30108f718f92721af3b95e74349a); the SHA-256 is the file_hash of tf.keras.datasets.cifar10.load_data
# (tensorflow/python/keras/datasets/cifar10.py).
CIFAR10_PUBLISHED_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


def test_published_digests_are_the_recorded_ones():
    assert data.FASHION_MNIST_SHA256 == FASHION_MNIST_PUBLISHED_SHA256
    assert data.cifar.CIFAR10_SHA256 == CIFAR10_PUBLISHED_SHA256


def test_download_success(tmp_path, mirror, umask_022):
    body = bytes(range(256)) * 5000  # 1.3 MB: several chunks
    digest = mirror.add("blob.bin", body)
    out = download_file(mirror.url + "blob.bin", tmp_path / "data" / "blob.bin", digest.upper(), chunk_size=1 << 16)
    assert out.read_bytes() == body
    assert os.listdir(tmp_path / "data") == ["blob.bin"]  # no temporary file left
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's owner-only 0600
    source = tmp_path / "src.bin"  # file:// mirrors work too
    source.write_bytes(b"xyz")
    copy = download_file(source.as_uri(), tmp_path / "copy.bin", hashlib.sha256(b"xyz").hexdigest(), progress=False)
    assert copy.read_bytes() == b"xyz"


@pytest.mark.parametrize("existing", [None, b"previous version"])
def test_download_checksum_mismatch_leaves_nothing(tmp_path, mirror, existing):
    mirror.add("blob.bin", b"corrupted bytes")
    dest = tmp_path / "blob.bin"
    if existing is not None:
        dest.write_bytes(existing)
    url = mirror.url + "blob.bin"
    with pytest.raises(ValueError, match="SHA-256") as err:
        download_file(url, dest, hashlib.sha256(b"official bytes").hexdigest(), progress=False)
    assert url in str(err.value) and str(dest) in str(err.value)
    assert os.listdir(tmp_path) == ([] if existing is None else ["blob.bin"])
    if existing is not None:
        assert dest.read_bytes() == existing  # the old file is untouched


@pytest.mark.parametrize("failure, message", [("truncate", "interrupted"),
                                              ("missing", "HTTP 404"), ("refused", "download failed")])
def test_download_failed_transfer_leaves_nothing(tmp_path, mirror, failure, message):
    digest = mirror.add("blob.bin", b"\x07" * 1000)
    if failure == "truncate":
        mirror.truncate.add("blob.bin")
    name = "absent.bin" if failure == "missing" else "blob.bin"
    if failure == "refused":  # a port nothing listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/blob.bin" if failure == "refused" else mirror.url + name
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(DownloadError, match=message) as err:
        download_file(url, dest, digest, progress=False)
    assert url in str(err.value) and str(dest) in str(err.value)
    assert os.listdir(tmp_path / "out") == []


def _fashion_files(labels_train=(3, 1, 4)):
    def idx(a):
        return gzip.compress(bytes([0, 0, 8, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
                             + a.astype(np.uint8).tobytes())

    n = len(labels_train)
    arrays = {"x_train": np.arange(n * 4).reshape(n, 2, 2), "y_train": np.array(labels_train),
              "x_test": np.arange(8).reshape(2, 2, 2), "y_test": np.array([9, 0])}
    return arrays, {data.FASHION_MNIST_FILES[k]: idx(a) for k, a in arrays.items()}


def test_load_dataset_downloads_fashion_mnist(tmp_path, mirror, monkeypatch):
    arrays, files = _fashion_files()
    for name, body in files.items():  # published digest -> SHA-256 of the synthetic file (hashlib)
        monkeypatch.setitem(data.FASHION_MNIST_SHA256, name, mirror.add(name, body))
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, download=True, base_url=mirror.url, standardize=False)
    assert sorted(os.listdir(tmp_path / "fashion_mnist")) == sorted(files)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_allclose(ds.x_test[..., 0], arrays["x_test"] / 255.0)
    assert sorted(mirror.requests) == sorted(files)
    assert data.download_dataset("fashion-mnist", tmp_path, base_url=mirror.url) == []  # all present
    assert data.download_dataset("digits", tmp_path) == []  # nothing to download
    assert len(mirror.requests) == len(files)


def test_downloaded_labels_are_checked(tmp_path, mirror, monkeypatch):
    _, files = _fashion_files(labels_train=(3, 200, 4))
    for name, body in files.items():  # published digest -> SHA-256 of the synthetic file (hashlib)
        monkeypatch.setitem(data.FASHION_MNIST_SHA256, name, mirror.add(name, body))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: Fashion-MNIST labels .*\[200\]"):
        load_dataset("fashion_mnist", data_dir=tmp_path, download=True, base_url=mirror.url)


def _cifar_archive(n=2):
    import pickle

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 b"labels": rng.integers(0, 10, n).tolist()}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_cifar10_download_via_environment(tmp_path, mirror, monkeypatch):
    archive = _cifar_archive()
    monkeypatch.setenv("LSGEO_DATA_URL", mirror.url)
    monkeypatch.setenv("LSGEO_DATA_DIR", str(tmp_path))
    mirror.add("cifar-10-python.tar.gz", archive)  # the published digest (CIFAR10_PUBLISHED_SHA256) does not match
    with pytest.raises(ValueError, match=rf"{mirror.url}cifar-10-python.tar.gz: SHA-256"):
        load_dataset("cifar10", download=True)
    assert os.listdir(tmp_path / "cifar10") == []

    # the published digest replaced by the SHA-256 of the synthetic archive (hashlib)
    monkeypatch.setattr(data.cifar, "CIFAR10_SHA256", hashlib.sha256(archive).hexdigest())
    ds = load_dataset("cifar-10", download=True, n_train=4)
    assert ds.x_train.shape == (4, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    assert os.listdir(tmp_path / "cifar10") == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("call, match", [
    (lambda: data.download_dataset("cifar10", "/nonexistent", base_url="127.0.0.1:8000"), "base_url"),
    (lambda: download_file("ftp://x/y", "/tmp/y", "0" * 64), "url"),
    (lambda: download_file("http://x/y", "/tmp/y", "abc"), "sha256"),
    (lambda: download_file("http://x/y", "/tmp/y", "0" * 64, chunk_size=0), "chunk_size"),
    (lambda: download_file("http://x/y", "/tmp/y", "0" * 64, timeout=-1), "timeout"),
    (lambda: data.download_dataset("imagenet"), "name"),
])
def test_download_arguments_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_download_flag_must_be_bool():
    with pytest.raises(TypeError, match="download"):
        load_dataset("digits", download="yes")


def test_invalid_environment_url_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LSGEO_DATA_URL", "not-a-url")
    with pytest.raises(ValueError, match="LSGEO_DATA_URL"):
        data.download_cifar10(tmp_path)


def test_write_atomic(tmp_path, umask_022):
    path = write_atomic(tmp_path / "a" / "b.json", "{}\n")
    assert path.read_text() == "{}\n" and stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o640)
    write_atomic(path, b"new")  # replaces, keeping the mode of the file it replaces
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError, match="interrupted"), atomic_writer(path) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["b.json"]
    with pytest.raises(TypeError, match="data"):
        write_atomic(path, 3)
    arrays = data.savez_atomic(tmp_path / "c.npz", x=np.arange(3))
    with np.load(arrays) as f:
        np.testing.assert_array_equal(f["x"], np.arange(3))


class _Drip:
    """A loopback server that announces ``size`` bytes and sends one every ``interval`` seconds; it hangs
    up after ``give_up`` seconds (so that a client without an overall bound fails in bounded test time)."""

    def __init__(self, size=1000, interval=0.4, give_up=8.0):
        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self.wfile.flush()
                deadline = time.monotonic() + give_up
                try:
                    for _ in range(size):
                        if stop.wait(interval) or time.monotonic() > deadline:
                            return
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.bin"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_download_timeout_bounds_the_whole_transfer(tmp_path):
    """Before: ``timeout`` bounded each read, so a byte every 0.4 s kept a 1.5 s-timeout transfer alive
    (here: 1000 bytes, 400 s; the server hangs up after 8 s)."""
    drip = _Drip()
    try:
        start = time.monotonic()
        with pytest.raises(DownloadError, match=r"did not finish within timeout=1.5 s"):
            download_file(drip.url, tmp_path / "slow.bin", "0" * 64, timeout=1.5, progress=False)
        elapsed = time.monotonic() - start
    finally:
        drip.close()
    assert 1.4 < elapsed < 4.0, elapsed
    assert os.listdir(tmp_path) == []  # nothing left behind


def test_download_within_the_timeout_still_succeeds(tmp_path):
    drip = _Drip(size=3, interval=0.05)
    try:
        out = download_file(drip.url, tmp_path / "small.bin", hashlib.sha256(b"xxx").hexdigest(), timeout=5.0,
                            progress=False)
    finally:
        drip.close()
    assert out.read_bytes() == b"xxx"


def test_load_dataset_download_fetches_a_corrupt_file_again(tmp_path, mirror, monkeypatch):
    arrays, files = _fashion_files()
    for name, body in files.items():  # published digest -> SHA-256 of the synthetic file (hashlib)
        monkeypatch.setitem(data.FASHION_MNIST_SHA256, name, mirror.add(name, body))
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    for name, body in files.items():
        (folder / name).write_bytes(body)
    broken = data.FASHION_MNIST_FILES["y_train"]
    (folder / broken).write_bytes(files[broken][:-3])  # an interrupted copy: truncated
    with pytest.raises(ValueError, match="train-labels"):  # without download: the clear read error
        load_dataset("fashion_mnist", data_dir=tmp_path, standardize=False)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, download=True, base_url=mirror.url, standardize=False)
    assert mirror.requests == [broken]  # only the corrupt file is fetched again, in place
    assert (folder / broken).read_bytes() == files[broken]
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])


def test_cifar10_download_fetches_a_corrupt_archive_again(tmp_path, mirror, monkeypatch):
    archive = _cifar_archive()
    # the published digest replaced by the SHA-256 of the synthetic archive (hashlib, in _Mirror.add)
    monkeypatch.setattr(data.cifar, "CIFAR10_SHA256", mirror.add("cifar-10-python.tar.gz", archive))
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(archive[: len(archive) // 2])
    ds = load_dataset("cifar10", data_dir=tmp_path, download=True, base_url=mirror.url, n_train=4)
    assert ds.x_train.shape == (4, 32, 32, 3)
    assert mirror.requests == ["cifar-10-python.tar.gz"]
    assert (tmp_path / "cifar10" / "cifar-10-python.tar.gz").read_bytes() == archive
