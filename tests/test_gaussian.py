"""lsgeo.gaussian: the same numbers as jax.random.normal, and Threefry's published answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo.gaussian import normal, threefry2x32

# Random123's known-answer vectors for Threefry-2x32-20 (kat_vectors): (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_threefry_known_answers(key, counter, expected):
    k0, k1 = (np.uint32(k) for k in key)
    y0, y1 = threefry2x32(k0, k1, jnp.array([counter[0]], jnp.uint32), jnp.array([counter[1]], jnp.uint32))
    assert (int(y0[0]), int(y1[0])) == expected


SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (257, 33), (0, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bit_identical_to_jax_random_normal(shape):
    key = jax.random.key(11)
    ours = jax.jit(lambda k: normal(k, shape))(key)
    assert ours.shape == shape and ours.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.normal(key, shape)))


def test_raw_keys_split_keys_and_vmap():
    raw = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(np.asarray(normal(raw, (9,))), np.asarray(jax.random.normal(raw, (9,))))
    keys = jax.random.split(jax.random.key(4), 5)
    ours = jax.jit(jax.vmap(lambda k: normal(k, (6, 2))))(keys)
    ref = jax.vmap(lambda k: jax.random.normal(k, (6, 2)))(keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_other_dtypes_fall_back_to_jax(dtype):
    key = jax.random.key(5)
    np.testing.assert_array_equal(np.asarray(normal(key, (4, 3), dtype)), np.asarray(jax.random.normal(key, (4, 3), dtype)))


def test_float64_and_other_key_implementations_fall_back(x64):
    key = jax.random.key(6)
    ours = normal(key, (5,), jnp.float64)
    assert ours.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.normal(key, (5,), jnp.float64)))
    rbg = jax.random.key(6, impl="rbg")
    np.testing.assert_array_equal(np.asarray(normal(rbg, (5,))), np.asarray(jax.random.normal(rbg, (5,))))


def test_moments_of_a_large_draw():
    z = np.asarray(normal(jax.random.key(7), (200_000,)), np.float64)
    se = 1.0 / np.sqrt(z.size)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2.0) * se
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 5 * np.sqrt(0.05 * 0.95) * se
