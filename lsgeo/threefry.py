"""``jax.random`` for threefry keys, bit for bit, as straight-line code that XLA:CPU runs fast.

jax lowers the Threefry-2x32 hash on CPU as a rolled ``while`` loop (5 trips of 4 rounds, both
words written to memory after each trip). A noise-injection step derives its keys and draws its
noise with several such loops; under ``vmap`` (a sweep over sigma values) each loop costs far
more than its arithmetic. Here the 20 rounds are unrolled (one loop fusion per call), with the
counter layout of jax's default ``jax_threefry_partitionable=True``, so every function returns
exactly what its ``jax.random`` namesake returns (tested), only faster on CPU.

For a key (k0, k1) and the row-major index i of an output entry (n < 2^32 entries):

    (y0, y1)  = Threefry-2x32-20((k0, k1), (0, i))        (Salmon et al. 2011, Random123)
    split     : key_i = (y0, y1)
    bits      : b_i = y0 XOR y1
    fold_in(d): the new key is Threefry((k0, k1), (0, d))
    normal    : m_i = b_i >> 9;  f_i = float(0x3F800000 | m_i) - 1 in [0, 1);
                u_i = max(lo, f_i (1 - lo) + lo), lo = nextafter(-1, 0);  z_i = sqrt(2) erfinv(u_i)
    randint   : jax's two-draw modulus rule (see :func:`randint`).

One more XLA detail: a cheap elementwise producer is re-fused into every consumer, so a draw
used three times in an optimizer step (update, stored noise, divergence guard) would be hashed
three times, and a key derived by a few hashes would be re-derived inside the loop over the
numbers drawn from it. XLA never duplicates an integer remainder: :func:`normal` ends its hash in
the identity ``m mod (2^23 + 1)`` (m < 2^23), and key words pass through an identity made of
remainders (``_computed_once``), so each number and each key is hashed once.

Cost: about 130 integer operations per hash; ``normal`` adds one ``erfinv`` per number. Any other
key implementation, the non-partitionable layout, other dtypes or traced bounds fall back to
``jax.random`` (the same results by definition).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["threefry2x32", "fold_in", "split", "bits", "randint", "normal"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_SQRT2 = np.float32(math.sqrt(2.0))
_LOW = np.nextafter(np.float32(-1.0), np.float32(0.0))
_MANTISSA_BOUND = np.uint32(2**23 + 1)


def threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher with 20 rounds (Random123), unrolled; uint32 in and out.

    ``k0, k1``: the key words; ``x0, x1``: the counter words (broadcast together).
    """
    k2 = k0 ^ k1 ^ np.uint32(0x1BD11BDA)
    schedule = (k0, k1, k2)
    x0, x1 = x0 + k0, x1 + k1
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _typed(key) -> tuple[jax.Array, bool]:
    """(typed key, whether the caller passed a typed key)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key, True
    return jax.random.wrap_key_data(key), False


def _fast(key: jax.Array, n: int = 1) -> bool:
    return (
        key.shape == ()
        and 0 < n < 2**32
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and jax.config.jax_threefry_partitionable
    )


def _computed_once(words: jax.Array) -> jax.Array:
    """The uint32 ``words`` unchanged, as ((w >> 16) mod 65537) << 16 | (w & 0xFFFF) mod 65537.

    XLA re-fuses cheap producers into each consumer (a key derived by a few hashes would be
    re-derived inside the loop over every number drawn from it) but never duplicates an integer
    remainder, so this identity makes the producer run once.
    """
    high = jax.lax.rem(words >> np.uint32(16), np.uint32(65537))
    low = jax.lax.rem(words & np.uint32(0xFFFF), np.uint32(65537))
    return (high << np.uint32(16)) | low


def _hash_counters(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    k = _computed_once(jax.random.key_data(key))
    counter = jax.lax.iota(jnp.uint32, n)
    return threefry2x32(k[0], k[1], jnp.zeros_like(counter), counter)


def _like_input(key_data: jax.Array, typed: bool, like: jax.Array):
    return jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(like)) if typed else key_data


def fold_in(key, data):
    """``jax.random.fold_in(key, data)``: one hash; ``data`` an integer (may be traced)."""
    typed_key, typed = _typed(key)
    python_int = isinstance(data, (int, np.integer))
    if not _fast(typed_key) or jnp.ndim(data) != 0 or (python_int and not 0 <= data < 2**32):
        return jax.random.fold_in(key, data)
    k = jax.random.key_data(typed_key)
    d = np.uint32(data) if python_int else jnp.asarray(data).astype(jnp.uint32)
    y0, y1 = threefry2x32(k[0], k[1], np.uint32(0), d)
    return _like_input(jnp.stack([y0, y1]), typed, typed_key)


def split(key, num: int = 2):
    """``jax.random.split(key, num)`` (``num`` an int): ``num`` hashes."""
    typed_key, typed = _typed(key)
    if not isinstance(num, (int, np.integer)) or not _fast(typed_key, int(num)):
        return jax.random.split(key, num)
    y0, y1 = _hash_counters(typed_key, int(num))
    return _like_input(jnp.stack([y0, y1], axis=-1), typed, typed_key)


def bits(key, shape=()) -> jax.Array:
    """``jax.random.bits(key, shape)`` (uint32): one hash per entry."""
    shape = tuple(int(d) for d in shape)
    typed_key, _ = _typed(key)
    if not _fast(typed_key, math.prod(shape)):
        return jax.random.bits(key, shape)
    y0, y1 = _hash_counters(typed_key, math.prod(shape))
    return (y0 ^ y1).reshape(shape)


def randint(key, shape, minval: int, maxval: int, dtype=jnp.int32) -> jax.Array:
    """``jax.random.randint(key, shape, minval, maxval, dtype)`` for Python-int bounds and int32.

    jax's rule: (k1, k2) = split(key); h, l = bits(k1), bits(k2); span = maxval - minval (1 if
    empty); result = minval + ((h mod span) * (2^32 mod span) + l mod span) mod span, in uint32
    arithmetic (2^32 mod span computed as ((2^16 mod span)^2 mod span) with uint32 wrap-around).
    Its bias is about span^2 / 2^64.
    """
    shape = tuple(int(d) for d in shape)
    typed_key, _ = _typed(key)
    in_range = all(isinstance(v, (int, np.integer)) and -(2**31) <= v < 2**31 for v in (minval, maxval))
    if not (in_range and jnp.dtype(dtype) == jnp.int32 and _fast(typed_key, max(math.prod(shape), 1))):
        return jax.random.randint(key, shape, minval, maxval, dtype)
    lo, hi = int(minval), int(maxval)
    span = np.uint32(1 if hi <= lo else hi - lo)
    half = np.uint32(2**16 % int(span))
    multiplier = np.uint32((int(half) * int(half)) % 2**32 % int(span))
    k1, k2 = split(typed_key)
    high, low = bits(k1, shape), bits(k2, shape)
    offset = ((high % span) * multiplier + low % span) % span
    return (np.int32(lo) + offset.astype(jnp.int32)).astype(jnp.int32)


def normal(key, shape=(), dtype=float) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, the same numbers, hashed once per number.

    ``key``: a typed PRNG key or raw uint32 key data; ``dtype`` defaults to the default float type.
    """
    shape = tuple(int(d) for d in shape)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    typed_key, _ = _typed(key)
    n = math.prod(shape)
    if dtype != jnp.float32 or not _fast(typed_key, n):
        return jax.random.normal(typed_key, shape, dtype)
    y0, y1 = _hash_counters(typed_key, n)
    mantissa = jax.lax.rem((y0 ^ y1) >> np.uint32(9), _MANTISSA_BOUND)  # identity; see module docstring
    f = jax.lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32) - np.float32(1.0)
    u = jnp.maximum(_LOW, f * (np.float32(1.0) - _LOW) + _LOW)
    return (_SQRT2 * jax.lax.erf_inv(u)).reshape(shape)
