"""Downloads verified by SHA-256 and written atomically.

``download_file(url, path, sha256)`` streams ``url`` into a temporary file next to ``path`` (see
``lsgeo.data.atomic``) while hashing it, with a tqdm progress bar on stderr, and renames it to
``path`` only when the transfer is complete (as many bytes as the server's ``Content-Length``) and
the SHA-256 digest equals the expected one. Otherwise nothing is left behind: no ``path``, no
temporary file, and the error names the URL and the file:

- the transfer fails (connection refused, HTTP error, connection closed before ``Content-Length``
  bytes, or not finished within ``timeout`` seconds, the bound of the whole transfer):
  ``DownloadError`` (an ``OSError``);
- the bytes arrived but their digest differs (a corrupt or substituted file): ``ValueError``.

The official locations of Fashion-MNIST and CIFAR-10 are in ``lsgeo.data.idx`` and
``lsgeo.data.cifar``. A mirror replaces them: ``base_url`` (an argument of the download functions
and of ``load_dataset``), else ``$LSGEO_DATA_URL``; a file's URL is then ``<base_url>/<file name>``.
``http://``, ``https://`` and ``file://`` URLs work. Cost: one pass over the bytes; hashing and
writing sustain a few hundred MB/s (so the network is the limit), memory one chunk.

Example:
  >>> import hashlib, pathlib, tempfile
  >>> from lsgeo.data import download_file
  >>> with tempfile.TemporaryDirectory() as d:
  ...     source = pathlib.Path(d) / "mirror" / "blob.bin"
  ...     source.parent.mkdir()
  ...     _ = source.write_bytes(b"abc")
  ...     digest = hashlib.sha256(b"abc").hexdigest()
  ...     out = download_file(source.as_uri(), pathlib.Path(d) / "data" / "blob.bin", digest, progress=False)
  ...     out.read_bytes()
  b'abc'
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from lsgeo.data.atomic import atomic_writer
from lsgeo.validation import check_positive_int

__all__ = ["DATA_URL_ENV", "DownloadError", "download_file", "file_sha256", "resolve_base_url"]

DATA_URL_ENV = "LSGEO_DATA_URL"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCHEMES = ("http://", "https://", "file://")


class DownloadError(OSError):
    """A transfer that failed or stopped early; the message names the URL and the destination file."""


def resolve_base_url(base_url: str | None, default: str) -> str:
    """``base_url`` if given, else ``$LSGEO_DATA_URL`` if set and non-empty, else ``default``;
    always ending in ``/`` so that a file name can be appended. Raises ValueError naming
    ``base_url`` (or the variable) for a URL that is not http(s):// or file://.

    Example:
      >>> resolve_base_url("http://127.0.0.1:8000/mirror", "https://example.org/")
      'http://127.0.0.1:8000/mirror/'
    """
    if base_url is not None:
        value, name = base_url, "base_url"
    elif os.environ.get(DATA_URL_ENV):
        value, name = os.environ[DATA_URL_ENV], f"${DATA_URL_ENV}"
    else:
        value, name = default, "default"
    if not isinstance(value, str) or not value.startswith(_SCHEMES):
        raise ValueError(f"{name} must be a URL starting with http://, https:// or file://, got {value!r}")
    return value.rstrip("/") + "/"


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 hex digest of the file at ``path`` (read in chunks; a few hundred MB/s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, path: str | os.PathLike, sha256: str, *, progress: bool = True,
                  timeout: float = 60.0, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``path`` atomically and verify its SHA-256 digest; returns ``Path(path)``.

    Args:
      url: http(s):// or file:// URL.
      path: destination file (parent folders are created; an existing file is replaced only by a
        complete, verified download).
      sha256: expected hex digest (64 lowercase or uppercase hex digits).
      progress: show a tqdm bar (bytes, with the total when the server sends ``Content-Length``).
      timeout: seconds the whole transfer may take (connection, headers and body together; a server
        that sends a byte now and then cannot extend it).
      chunk_size: bytes read at a time.

    Raises:
      DownloadError: the transfer failed or ended before ``Content-Length`` bytes (names URL and file).
      ValueError: the digest of the received bytes is not ``sha256`` (names URL, file and both digests).
    """
    path = Path(path)
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
        raise ValueError(f"sha256 must be a hex SHA-256 digest (64 hex digits), got {sha256!r}")
    if not isinstance(url, str) or not url.startswith(_SCHEMES):
        raise ValueError(f"url must start with http://, https:// or file://, got {url!r}")
    check_positive_int(chunk_size, "chunk_size")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    expected = sha256.lower()
    try:
        with atomic_writer(path) as f:
            received, total, digest = _stream(url, f, progress=progress, timeout=timeout,
                                              chunk_size=chunk_size, label=path.name)
            if total is not None and received != total:
                raise DownloadError(f"{url}: transfer interrupted after {received} of {total} bytes; "
                                    f"{path} was not written")
            if digest != expected:
                raise ValueError(f"{url}: SHA-256 of the {received} bytes received is {digest}, expected "
                                 f"{expected}: the file is corrupt or not the official one; {path} was not written")
    except DownloadError:
        raise
    except _Deadline as e:
        got = f" ({e.args[0]} bytes received)" if e.args else ""
        raise DownloadError(f"{url}: the transfer did not finish within timeout={timeout} s{got}; "
                            f"{path} was not written") from None
    except http.client.IncompleteRead as e:  # a chunked transfer cut short
        raise DownloadError(f"{url}: transfer interrupted ({e!r}); {path} was not written") from e
    except (OSError, http.client.HTTPException) as e:  # urllib.error.URLError and timeouts are OSErrors
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else f"{type(e).__name__}: {e}"
        raise DownloadError(f"{url}: download failed ({reason}); {path} was not written") from e
    return path


def _set_read_timeout(response, seconds: float) -> None:
    """Bounds the next socket read of an HTTP ``response`` by ``seconds`` (no-op for file:// responses)."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _stream(url: str, out, *, progress: bool, timeout: float, chunk_size: int, label: str):
    """Copies ``url`` into the file ``out``; returns (bytes received, Content-Length or None, sha256).

    The whole transfer (connection, headers, body) must end within ``timeout`` seconds of the start:
    every socket wait is bounded by the time left, and the body is read with ``read1`` (what one
    receive returns), so a server that keeps sending a byte now and then cannot keep it alive.
    """
    from lsgeo import __version__

    deadline = time.monotonic() + timeout

    def time_left() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Deadline()
        return left

    request = urllib.request.Request(url, headers={"User-Agent": f"lsgeo/{__version__}"})
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.strip().isdigit() else None
            read = getattr(response, "read1", response.read)
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                      disable=not progress) as bar:
                while True:
                    _set_read_timeout(response, time_left())
                    chunk = read(chunk_size)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (_Deadline, TimeoutError) as e:
        if time.monotonic() < deadline and not isinstance(e, _Deadline):
            raise
        raise _Deadline(received) from None
    return received, total, digest.hexdigest()


class _Deadline(Exception):
    """The transfer did not end within ``timeout`` seconds (args: bytes received so far, if known)."""
