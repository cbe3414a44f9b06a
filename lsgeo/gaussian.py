"""Standard normal draws, bit for bit those of ``jax.random.normal``, computed once per step on CPU.

For a threefry2x32 key (jax's default, with the default ``jax_threefry_partitionable=True``) and
float32, ``jax.random.normal(key, shape)`` is, with i the row-major index of an entry and n < 2^32,

    (y0, y1) = Threefry-2x32-20(key, (0, i))           (Salmon et al. 2011, Random123)
    m_i = (y0 XOR y1) >> 9                             (23 random mantissa bits)
    f_i = float(0x3F800000 | m_i) - 1                  in [0, 1)
    u_i = max(lo, f_i (1 - lo) + lo),  lo = nextafter(-1, 0)
    z_i = sqrt(2) erfinv(u_i).

:func:`normal` computes the same numbers. Two things make ``jax.random.normal`` slow inside a
jitted optimizer step on XLA:CPU: jax lowers the 20 hash rounds as a rolled ``while`` loop that
writes both words to memory after every 4 rounds, and XLA re-fuses the cheap integer hash into
every consumer of the draw (a noise-injection step has three: the update, the stored noise, the
divergence guard), so the hash runs several times. Here the rounds are unrolled into one loop
fusion, and the hash ends in the identity ``m mod (2^23 + 1)`` (m < 2^23): XLA never duplicates
an integer remainder into several consumers, so the hash runs once per number per call.
``benchmarks/bench_optim.py`` prints both costs.

Cost: about 130 integer operations and one ``erfinv`` per number, one pass over the output.
Any other key implementation, dtype or size falls back to ``jax.random.normal`` (same result).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normal", "threefry2x32"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_SQRT2 = np.float32(math.sqrt(2.0))
_LOW = np.nextafter(np.float32(-1.0), np.float32(0.0))
_MANTISSA_BOUND = np.uint32(2**23 + 1)


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher with 20 rounds (Random123), unrolled; uint32 in and out.

    ``k0, k1``: the key words (scalars); ``x0, x1``: the counter words (arrays of one shape).
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


def _is_fast_case(key: jax.Array, n: int, dtype) -> bool:
    return (
        dtype == jnp.float32
        and 0 < n < 2**32
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and jax.config.jax_threefry_partitionable
    )


def normal(key: jax.Array, shape=(), dtype=float) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, the same numbers, hashed once per number.

    ``key``: a typed PRNG key or raw uint32 key data (as ``jax.random.normal`` takes); ``dtype``
    defaults to the default float type, as there.
    """
    shape = tuple(int(d) for d in shape)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    n = math.prod(shape)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if not _is_fast_case(key, n, dtype):
        return jax.random.normal(key, shape, dtype)
    k = jax.random.key_data(key)
    counter = jax.lax.iota(jnp.uint32, n)
    y0, y1 = threefry2x32(k[0], k[1], jnp.zeros_like(counter), counter)
    mantissa = jax.lax.rem((y0 ^ y1) >> np.uint32(9), _MANTISSA_BOUND)  # identity; see module docstring
    f = jax.lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32) - np.float32(1.0)
    u = jnp.maximum(_LOW, f * (np.float32(1.0) - _LOW) + _LOW)
    return (_SQRT2 * jax.lax.erf_inv(u)).reshape(shape)
