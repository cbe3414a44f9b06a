"""Argument validation for the public functions: a ValueError (or TypeError) that names the argument.

Value checks run only on concrete inputs (Python numbers, numpy and committed jax arrays): under
``jit``/``vmap`` the arguments are tracers and the checks cost nothing. Shape and structure checks
use static information and run under tracing too.

Example:
  >>> from lsgeo import validation
  >>> validation.check_positive_int(3, "num_probes")
  >>> validation.check_sigma(-0.1)
  Traceback (most recent call last):
  ...
  ValueError: sigma must be a finite number >= 0, got -0.1
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "is_concrete",
    "check_sigma",
    "check_choice",
    "check_positive_int",
    "check_nonnegative_int",
    "check_callable",
    "check_same_structure",
    "check_float_params",
    "check_batch",
    "check_class_labels",
    "check_sign_labels",
    "check_key",
    "check_loss_targets",
]


def is_concrete(x) -> bool:
    """Whether ``x`` holds values (not a tracer inside ``jit``/``vmap``/``grad``)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def check_sigma(sigma, name: str = "sigma") -> None:
    """``sigma`` must be a real scalar, finite and >= 0 (a bool or a string is an error); callables
    (optax schedules) and tracers pass."""
    if callable(sigma) or not is_concrete(sigma):
        return
    if isinstance(sigma, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{name} must be a finite number >= 0, got {sigma!r} ({type(sigma).__name__})")
    value = np.asarray(sigma)
    if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        raise ValueError(f"{name} must be a finite number >= 0, got {sigma!r} (dtype {value.dtype})")
    if value.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {sigma!r}")


def check_choice(value, name: str, choices) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_nonnegative_int(value, name: str) -> None:
    """``value`` must be a Python/numpy integer >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def check_positive_int(value, name: str) -> None:
    """``value`` must be a Python/numpy integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_callable(fn, name: str) -> None:
    """``fn`` must be callable (a TypeError naming ``name`` otherwise)."""
    if not callable(fn):
        raise TypeError(f"{name} must be a callable, got {type(fn).__name__}")


def check_same_structure(reference: PyTree, other: PyTree, name: str, reference_name: str = "params") -> None:
    """Raises ValueError naming ``name`` unless ``other`` has the structure and leaf shapes of ``reference``."""
    ref_def = jax.tree_util.tree_structure(reference)
    other_def = jax.tree_util.tree_structure(other)
    if ref_def != other_def:
        raise ValueError(
            f"{name} must have the same pytree structure as {reference_name}; got {other_def}, expected {ref_def}"
        )
    for (path, r), o in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree_util.tree_leaves(other)):
        if np.shape(r) != np.shape(o):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} has shape {np.shape(o)}, "
                f"expected {np.shape(r)} as in {reference_name}"
            )


def check_float_params(params: PyTree, name: str = "params") -> None:
    """Every leaf of ``params`` must be a floating-point array (gradients and noise live there)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; parameters must be "
                f"floating point (e.g. jnp.asarray(w, jnp.float32))"
            )


def check_batch(batch, name: str = "batch", *, common_axis: bool = False) -> int | None:
    """A batch must not be empty: every array leaf with a leading axis has at least one example.

    With ``common_axis=True`` (microbatching, minibatching) every leaf must have a leading example
    axis and all must agree on its size n. Returns n (None when the leaves have no common axis).
    """
    leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(batch) if hasattr(leaf, "shape")]
    sizes = {jax.tree_util.keystr(path): (leaf.shape[0] if leaf.ndim else None) for path, leaf in leaves}
    if common_axis:
        if not leaves:
            raise ValueError(f"{name} must be a pytree of arrays with a leading example axis, got {type(batch).__name__}")
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"{name} leaves must share a leading example axis; got leading sizes {sizes}")
    for where, n in sizes.items():
        if n == 0:
            raise ValueError(f"{name} is empty: leaf {where or '(root)'} has 0 examples along its leading axis")
    values = set(sizes.values())
    return values.pop() if len(values) == 1 and None not in values else None


def check_class_labels(labels, num_classes: int, name: str = "labels") -> None:
    """Concrete ``labels`` must be integers in ``[0, num_classes)`` (a label of -1 or k would silently
    index the wrong class or give NaN)."""
    if not is_concrete(labels):
        return
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices in [0, {num_classes}), got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)]
        raise ValueError(
            f"{name} must be in [0, {num_classes}) for {num_classes} outputs; got values {np.unique(bad)[:5].tolist()}"
        )


def check_sign_labels(labels, name: str = "labels") -> None:
    """Concrete ``labels`` must be in {-1, +1} (the logistic loss log(1 + exp(-y phi)))."""
    if not is_concrete(labels):
        return
    y = np.asarray(labels)
    if y.size and not np.all((y == 1) | (y == -1)):
        bad = np.unique(y[(y != 1) & (y != -1)])[:5].tolist()
        raise ValueError(f"{name} must be -1 or +1 for the logistic loss; got values {bad} (map {{0, 1}} to 2 y - 1)")


def check_key(key, name: str = "key") -> None:
    """``key`` must be a JAX PRNG key: a typed key (``jax.random.key(0)``) or a raw ``uint32`` key
    (``jax.random.PRNGKey(0)``), a single one (no batch of keys). An int, None or a string is an error
    naming ``name`` (an int seed is not a key: ``jax.random.key(seed)`` makes one)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if np.ndim(key) != 0:
            raise ValueError(f"{name} must be a single PRNG key, got a batch of keys of shape {np.shape(key)}")
        return
    if dtype is not None and np.dtype(dtype) == np.uint32 and np.ndim(key) == 1 and np.shape(key)[0] in (2, 4):
        return
    raise ValueError(
        f"{name} must be a JAX PRNG key such as jax.random.key(0), got {key!r:.60}"
        + (" (an int seed is not a key: pass jax.random.key(seed))" if isinstance(key, (int, np.integer)) else "")
    )


def check_loss_targets(predict, loss, params, batch) -> None:
    """Runs the target checks of ``loss`` (class labels in ``[0, k)``, signs in {-1, +1}, shapes) on the
    concrete targets of ``batch = (x, y)`` before anything is traced: ``loss`` is evaluated eagerly on zero
    predictions of the model's output shape (``jax.eval_shape``, no forward pass; O(n k)). Inside ``jit``
    the targets are tracers and nothing is checked. Without it a label of -1 silently indexes class k - 1
    and a label >= k gives NaN in a compiled entry point."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return
    x, y = batch
    if not (is_concrete(y) and is_concrete(x) and is_concrete(params)):
        return
    out = jax.eval_shape(predict, params, x)
    loss(jnp.zeros(out.shape, out.dtype), jnp.asarray(y))
