"""One seed, disjoint random streams (issue 20): initialisation, minibatch order, augmentation and
noise injection draw from different keys even when the same seed feeds ``train`` and ``noise_injection``."""

import itertools

import jax
import numpy as np
import optax
import pytest

from lsgeo.optim import noise_injection, noise_key
from lsgeo.streams import STREAMS, check_seed, stream
from lsgeo.train import augment_key, epoch_permutation, split_key


def _data(k):
    return tuple(np.asarray(jax.random.key_data(k)).tolist())


@pytest.mark.parametrize("seed", [0, 3])
def test_init_data_permutation_augmentation_and_noise_keys_are_all_distinct(seed):
    init_key, data_key = split_key(seed)
    noise_base = jax.random.wrap_key_data(noise_key(seed))
    # the key noise_injection(seed=seed) stores is the one noise_key documents
    state = noise_injection(optax.sgd(0.1), 0.1, seed=seed).init({"w": np.zeros(2, np.float32)})
    assert _data(noise_base) == tuple(np.asarray(state.key).tolist())
    keys = {
        "init": _data(init_key),
        "data": _data(data_key),
        "noise base": _data(noise_base),
        **{f"noise step {t}": _data(jax.random.fold_in(noise_base, t)) for t in range(0, 6)},
        **{f"epoch {e}": _data(stream(data_key, "permutation", e)) for e in range(0, 6)},
        **{f"augment step {t}": _data(augment_key(data_key, t)) for t in range(0, 6)},
        "permutation root": _data(stream(data_key, "permutation")),
        "augment root": _data(stream(data_key, "augment")),
    }
    for (a, ka), (b, kb) in itertools.combinations(keys.items(), 2):
        assert ka != kb, f"{a} and {b} share a key"


def test_epoch_permutation_and_augment_key_follow_the_documented_subtrees():
    _, data_key = split_key(1)
    root = jax.random.key(1)
    assert _data(data_key) == _data(jax.random.fold_in(root, STREAMS["data"]))
    perm_key = jax.random.fold_in(jax.random.fold_in(data_key, STREAMS["permutation"]), 2)
    np.testing.assert_array_equal(epoch_permutation(data_key, 2, 10), jax.random.permutation(perm_key, 10))
    aug = jax.random.fold_in(jax.random.fold_in(data_key, STREAMS["augment"]), 5)
    assert _data(augment_key(jax.random.key_data(data_key), 5)) == _data(aug)


def test_the_old_aliases_are_gone():
    """Before: data_key == noise key of step 1 (split(k)[1] == fold_in(k, 1)), and the augmentation
    root == the key of epoch 1's permutation."""
    for seed in range(4):
        _, data_key = split_key(seed)
        noise_base = jax.random.wrap_key_data(noise_key(seed))
        noise_steps = {_data(jax.random.fold_in(noise_base, t)) for t in range(1, 10)}
        assert _data(data_key) not in noise_steps
        perms = {tuple(np.asarray(epoch_permutation(data_key, e, 12)).tolist()) for e in range(4)}
        augment_roots = {tuple(np.asarray(jax.random.permutation(k, 12)).tolist())
                         for k in (jax.random.split(data_key)[1], stream(data_key, "augment"))}
        assert not perms & augment_roots


@pytest.mark.parametrize("bad", ["a", 2**40, -(2**31) - 1, 1.5, True, None, np.zeros(3, np.int32)])
def test_bad_seeds_raise_naming_the_argument(bad):
    with pytest.raises(ValueError, match="seed"):
        check_seed(bad, "seed")
    with pytest.raises(ValueError, match="seed"):
        noise_injection(optax.sgd(0.1), 0.1, seed=bad)


def test_good_seeds_pass():
    for good in [0, 2**32 - 1, -1, np.int64(5), np.uint32(7), jax.random.key(0), jax.random.key_data(jax.random.key(0))]:
        check_seed(good, "key")
        noise_key(good)


def test_train_accepts_every_documented_seed_and_a_key_gives_the_int_seeds_run():
    from _train_problem import W0, X, Y, loss
    from lsgeo.train import train

    a = train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=2, batch_size=4, key=2**32 - 1)
    b = train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=2, batch_size=4, key=jax.random.key(2**32 - 1))
    np.testing.assert_array_equal(a.history["train_loss"], b.history["train_loss"])
    np.testing.assert_array_equal(a.state.data_key, jax.random.key_data(split_key(2**32 - 1)[1]))
