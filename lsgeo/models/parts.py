"""The parts the models share: activations, kernel initialisers and input checks.

``mean_field_init`` is the initialisation of Section 3 of Orvieto et al. (AISTATS 2023): entries of
W_i with std 1/sqrt(d_i d_{i-1}), so that ||W_i||_F^2 = O(1) as the width grows.

Example:
  >>> import jax
  >>> w = mean_field_init(jax.random.key(0), (100, 400))
  >>> round(float(w.std() * (100 * 400) ** 0.5), 1)
  1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.validation import check_choice

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "mean_field_init",
    "kernel_init",
    "activation_fn",
    "check_widths",
    "check_batched",
    "check_images",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "softplus": nn.softplus,
    "gelu": nn.gelu,
    "sigmoid": nn.sigmoid,
    "linear": lambda x: x,
}

INITS = ("standard", "he", "mean_field")


def check_widths(widths, name: str = "widths") -> tuple[int, ...]:
    """``widths`` as a tuple of positive ints, or a ValueError naming ``name``."""
    try:
        widths = tuple(widths)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {widths!r}") from None
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w <= 0:
            raise ValueError(f"{name} must be a sequence of positive integers, got {widths!r}")
    return widths


def check_batched(x) -> None:
    """``x`` must have a leading example axis."""
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [n, d, ...] (use x[None] for one example), got shape {x.shape}")


def check_images(x) -> None:
    """``x`` must be NHWC images."""
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC images [n, H, W, C], got shape {x.shape}")


def activation_fn(activation) -> Callable[[jax.Array], jax.Array]:
    """A callable activation, or the one named in ``ACTIVATIONS``."""
    if callable(activation):
        return activation
    check_choice(activation, "activation", ACTIVATIONS)
    return ACTIVATIONS[activation]


def mean_field_init(key, shape, dtype=jnp.float32):
    """Kernel initialiser of Section 3: i.i.d. N(0, 1 / (d_in d_out)) entries.

    For a ``Dense`` kernel ``[d_in, d_out]`` (= W_i^T with W_i in R^{d_i x d_{i-1}}) the std is
    1/sqrt(d_i d_{i-1}), so ||W_i||_F^2 = O(1) as the width grows (the mean-field scaling).
    For a conv kernel ``[..., c_in, c_out]`` the receptive field counts in the fan-in.
    """
    fan_in = int(np.prod(shape[:-1]))
    fan_out = int(shape[-1])
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in * fan_out)


def kernel_init(init: str):
    """The kernel initialiser named ``init``: "standard" (LeCun normal), "he" or "mean_field"."""
    check_choice(init, "init_scheme", INITS)
    if init == "mean_field":
        return mean_field_init
    if init == "he":
        return nn.initializers.he_normal()
    return nn.initializers.lecun_normal()
