"""lsgeo.train.augment: the CIFAR-10 random crop + flip is correct, reproducible and usable in training."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsgeo import train
from lsgeo.train.augment import crop_flip, random_crop_flip


def _candidates(image, padding):
    """Every crop/flip of ``image`` the augmentation may produce, computed with numpy."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    out = {}
    for dy, dx, flip in itertools.product(range(2 * padding + 1), range(2 * padding + 1), (False, True)):
        crop = padded[dy : dy + h, dx : dx + w]
        out[(dy, dx, flip)] = crop[:, ::-1] if flip else crop
    return out


def test_crop_flip_of_a_known_image():
    image = jnp.arange(1.0, 26.0).reshape(5, 5, 1)  # pixel (i, j) = 5 i + j + 1
    crop = np.asarray(crop_flip(image, 3, 1, True, padding=2))[..., 0]  # image rows 1..5, columns -1..3, mirrored
    np.testing.assert_array_equal(
        crop, [[9, 8, 7, 6, 0], [14, 13, 12, 11, 0], [19, 18, 17, 16, 0], [24, 23, 22, 21, 0], [0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(crop_flip(image, 2, 2, False, padding=2), image)  # the centre offset: unchanged


def test_random_crop_flip_draws_every_crop_per_example_and_reproducibly():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(400, 3, 3, 2)), jnp.float32)
    x = x.at[:].set(x[0])  # 400 copies of one image: each gets its own crop
    y = jnp.arange(400)
    aug = jax.jit(random_crop_flip, static_argnames="padding")
    out, labels = aug(jax.random.key(1), (x, y), padding=1)
    np.testing.assert_array_equal(labels, y)
    again, _ = aug(jax.random.key(1), (x, y), padding=1)
    np.testing.assert_array_equal(out, again)  # same key, same batch
    assert not np.array_equal(aug(jax.random.key(2), (x, y), padding=1)[0], out)
    candidates = _candidates(np.asarray(x[0]), 1)
    drawn = [next(k for k, c in candidates.items() if np.array_equal(c, o)) for o in np.asarray(out)]
    counts = np.array([drawn.count(k) for k in candidates])  # 18 outcomes, 400 draws: about 22 each
    assert counts.min() >= 8 and counts.max() <= 40, counts
    assert 150 <= sum(k[2] for k in drawn) <= 250  # flipped with probability 1/2


def test_augmented_training_is_reproducible_and_resumes_bit_for_bit():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4, 4, 1)), jnp.float32)
    data = (x, jnp.arange(8) % 2)

    def f(w, batch):
        logits = batch[0].reshape(batch[0].shape[0], -1) @ w
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    w0, opt = jnp.zeros((16, 2)), optax.sgd(0.5)
    kwargs = dict(batch_size=4, augment=random_crop_flip)
    full = train.train(f, opt, w0, data, num_steps=6, key=3, **kwargs)
    half = train.train(f, opt, w0, data, num_steps=3, key=3, **kwargs)
    resumed = train.train(f, opt, half.state, data, num_steps=3, **kwargs)
    np.testing.assert_array_equal(resumed.params, full.params)
    plain = train.train(f, opt, w0, data, num_steps=6, key=3, batch_size=4)
    assert not np.allclose(plain.params, full.params)


def test_random_crop_flip_rejects_non_images():
    with pytest.raises(ValueError, match="NHWC"):
        random_crop_flip(jax.random.key(0), (jnp.ones((2, 4)), jnp.ones(2)))
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(jax.random.key(0), (jnp.ones((2, 4, 4, 1)),), padding=-1)


def test_docstring_example():
    import doctest

    from lsgeo.train import augment

    assert doctest.testmod(augment, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE).failed == 0
