"""Random streams: one seed, disjoint key subtrees for initialisation, data order, augmentation and noise.

A training run with seed s draws from four streams. Each is a subtree of the root key ``key(s)``
reached by ``fold_in`` with a fixed tag (the ASCII of its name), and inside a stream the index
(epoch, step) is folded in last:

    root = jax.random.key(s)
    init                       fold_in(root, STREAMS["init"])
    data_key                   fold_in(root, STREAMS["data"])
      permutation of epoch e   fold_in(fold_in(data_key, STREAMS["permutation"]), e)
      augmentation of step t   fold_in(fold_in(data_key, STREAMS["augment"]), t)
    noise base k               fold_in(root, STREAMS["noise"])
      noise of step t          fold_in(k, t)

Only ``fold_in`` is used, never ``split`` next to it: with JAX's partitionable Threefry,
``split(k)[i] == fold_in(k, i)``, so mixing the two at one level aliases streams (before this layout
the data key equalled noise injection's step-1 key when one seed fed both, and the augmentation root
equalled epoch 1's permutation key). Keys of different paths are distinct Threefry hashes, so a seed
shared by ``lsgeo.train.train(key=s)`` and ``lsgeo.optim.noise_injection(seed=s)`` (as
``lsgeo.train.sweep`` does) gives independent streams.

Example:
  >>> import jax
  >>> root = jax.random.key(0)
  >>> a, b = (jax.random.key_data(stream(root, name)) for name in ("data", "noise"))
  >>> bool((a != b).any())
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["STREAMS", "as_key", "check_seed", "stream"]


def _tag(name: str) -> int:
    return int.from_bytes(name[:4].ljust(4).encode("ascii"), "big")


#: the ``fold_in`` tag of each stream (the ASCII bytes of the first four letters of its name)
STREAMS = {name: _tag(name) for name in ("init", "data", "noise", "permutation", "augment")}

_SEED_RANGE = (-(2**31), 2**32)


def check_seed(key, name: str = "key") -> None:
    """Raises ValueError naming ``name`` unless ``key`` is a seed :func:`as_key` accepts.

    Accepted: a Python or numpy integer in [-2**31, 2**32) (larger ones would wrap silently onto
    other seeds), a 0-d integer jax array (possibly traced), a typed PRNG key, or raw uint32 key data.
    """
    if isinstance(key, jax.core.Tracer):
        return
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim != 0:
            raise ValueError(f"{name} must be a single PRNG key, got an array of keys of shape {key.shape}")
        return
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer, np.ndarray, jax.Array)):
        raise ValueError(f"{name} must be an integer seed or a jax PRNG key, got {type(key).__name__} {key!r}")
    arr = np.asarray(key)
    if arr.dtype == np.uint32 and arr.ndim == 1:
        return  # raw key data; jax checks its length
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer seed or a jax PRNG key, got {arr.dtype} of shape {arr.shape}")
    if not _SEED_RANGE[0] <= int(arr) < _SEED_RANGE[1]:
        raise ValueError(f"{name} must be an integer seed in [-2**31, 2**32), got {int(arr)}")


def as_key(key) -> jax.Array:
    """A typed PRNG key from an integer seed (possibly traced), a typed key or raw uint32 key data."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == jnp.uint32 and key.ndim == 1:
        return jax.random.wrap_key_data(key)
    return jax.random.key(key)


def stream(key, name: str, index=None) -> jax.Array:
    """The key of stream ``name`` (a key of ``STREAMS``) under ``key``, and of its ``index``-th draw if given."""
    k = jax.random.fold_in(as_key(key), STREAMS[name])
    return k if index is None else jax.random.fold_in(k, index)
