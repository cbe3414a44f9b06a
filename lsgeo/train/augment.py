"""Data augmentation on device: the standard CIFAR-10 random crop and horizontal flip.

``augment(key, batch) -> batch`` functions for ``lsgeo.train.train(..., augment=...)`` and
``lsgeo.train.sweep``: the loop calls them on every training batch with a key derived from the data
key and the step (:func:`lsgeo.train.augment_key`), so an augmented run is reproducible, resumes bit
for bit, and vmaps over the members of a sweep.

``random_crop_flip`` is the augmentation of the usual CIFAR-10 SGD recipe (He et al. 2016, Section
4.2; the baseline of Orvieto et al. 2023, Figure 6): each image, independently, is zero-padded by
``padding`` pixels on every side, a window of the original size is cut at a uniformly random offset
(dy, dx) in {0, ..., 2 padding}^2, and the result is mirrored left-right with probability 1/2.
Pure ``jnp`` (one ``dynamic_slice`` per image, ``vmap``-ed): jit- and vmap-able.
Cost: O(n H W C) per batch; memory of one padded batch.

Example:
  >>> import jax, jax.numpy as jnp
  >>> image = jnp.arange(16.0).reshape(1, 4, 4, 1)
  >>> crop_flip(image[0], 0, 0, False, padding=1)[..., 0]     # offset (0, 0): one row and column of zeros
  Array([[ 0.,  0.,  0.,  0.],
         [ 0.,  0.,  1.,  2.],
         [ 0.,  4.,  5.,  6.],
         [ 0.,  8.,  9., 10.]], dtype=float32)
  >>> x, y = random_crop_flip(jax.random.key(0), (image, jnp.array([3])), padding=1)
  >>> x.shape, y.tolist()
  ((1, 4, 4, 1), [3])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lsgeo.validation import check_nonnegative_int

__all__ = ["crop_flip", "random_crop_flip"]


def crop_flip(image: jax.Array, dy, dx, flip, *, padding: int) -> jax.Array:
    """One ``[H, W, C]`` image zero-padded by ``padding``, cropped at offset ``(dy, dx)`` of the padded
    image (0 <= dy, dx <= 2 padding; ``(padding, padding)`` is the original) and mirrored left-right
    when ``flip``. Traceable in ``dy``, ``dx`` and ``flip``."""
    height, width, _ = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, image.shape[2]))
    return jnp.where(flip, crop[:, ::-1], crop)


def random_crop_flip(key: jax.Array, batch, *, padding: int = 4):
    """``batch = (x, y, ...)`` with every image of ``x`` ``[n, H, W, C]`` (NHWC) randomly cropped after
    zero-padding by ``padding`` and flipped left-right with probability 1/2, one key per example
    (module docstring). The other entries of ``batch`` are returned unchanged."""
    check_nonnegative_int(padding, "padding")
    x, *rest = batch
    if x.ndim != 4:
        raise ValueError(f"batch[0] must be NHWC images [n, H, W, C], got shape {x.shape}")
    keys = jax.random.split(key, x.shape[0])

    def one(k, image):
        k_offset, k_flip = jax.random.split(k)
        dy, dx = jax.random.randint(k_offset, (2,), 0, 2 * padding + 1)
        return crop_flip(image, dy, dx, jax.random.bernoulli(k_flip), padding=padding)

    return (jax.vmap(one)(keys, x), *rest)
