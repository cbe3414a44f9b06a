"""lsgeo.threefry: the same keys, bits and numbers as jax.random, and Threefry's published answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo.threefry import bits, fold_in, normal, randint, split, threefry2x32

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


def _data(key):
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_key_functions_equal_jax_random(seed):
    key = jax.random.key(seed)
    for data in (0, 1, 7, 2**31 + 5, 2**32 - 1):
        np.testing.assert_array_equal(_data(fold_in(key, data)), _data(jax.random.fold_in(key, data)))
    traced = jax.jit(lambda k, d: jax.random.key_data(fold_in(k, d)))(key, jnp.int32(41))
    np.testing.assert_array_equal(np.asarray(traced), _data(jax.random.fold_in(key, 41)))
    for num in (1, 2, 3, 6):
        np.testing.assert_array_equal(_data(split(key, num)), _data(jax.random.split(key, num)))
    for shape in [(), (5,), (2, 3)]:
        np.testing.assert_array_equal(np.asarray(bits(key, shape)), np.asarray(jax.random.bits(key, shape)))
    for lo, hi in [(0, 1), (0, 2), (0, 3), (0, 7), (-5, 12), (0, 100_000), (3, 3), (0, 2**31 - 1)]:
        for shape in [(), (4,)]:
            np.testing.assert_array_equal(
                np.asarray(randint(key, shape, lo, hi)), np.asarray(jax.random.randint(key, shape, lo, hi))
            )


def test_key_functions_keep_raw_keys_raw_and_work_under_vmap():
    raw = jax.random.PRNGKey(9)
    assert split(raw, 3).dtype == jnp.uint32 and split(raw, 3).shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(fold_in(raw, 4)), np.asarray(jax.random.fold_in(raw, 4)))
    keys = jax.random.split(jax.random.key(1), 6)
    counts = jnp.arange(6)
    ours = jax.jit(jax.vmap(lambda k, t: randint(split(fold_in(k, t))[0], (), 0, 5)))(keys, counts)
    ref = jax.vmap(lambda k, t: jax.random.randint(jax.random.split(jax.random.fold_in(k, t))[0], (), 0, 5))(keys, counts)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_tree_normal_like_equals_optax_tree_random_like():
    import optax.tree_utils as otu

    from lsgeo.tree import normal_like

    tree = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), jnp.zeros((2, 2, 2))], "c": jnp.zeros(())}
    key = jax.random.key(8)
    ours = jax.jit(normal_like)(key, tree)
    ref = otu.tree_random_like(key, tree, jax.random.normal)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
