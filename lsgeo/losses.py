"""Losses L(phi) on the n predictions, each the mean of a per-example loss l(phi_i, y_i), and their
output-space curvature.

The paper's L (Orvieto et al. 2023, Section 2):
  squared:   L(phi) = 1/(2n) sum_i ||y_i - phi_i||^2
  logistic:  L(phi) = 1/n sum_i log(1 + exp(-y_i phi_i)),   y_i in {-1, +1}
  softmax cross-entropy with integer labels: L(phi) = 1/n sum_i (logsumexp(phi_i) - phi_i[y_i]).

Because L is a mean, its Hessian is block diagonal: D2L(phi) = blockdiag(H_1, ..., H_n) / n with
H_i the k x k Hessian of l at phi_i. :func:`output_hessians` returns the H_i and
:func:`output_hessian_factors` a factorisation H_i = B_i diag(s_i) B_i^T (s_i = +-1). Both read one
registry, keyed by the loss function (wrappers made with ``functools.wraps``, e.g. ``jax.jit``, are
looked through): closed forms for the three losses above, registered here, and for any other mean
loss ``vmap(jax.hessian)`` of the one-example loss (and its ``eigh``). Register the closed form of a
loss of your own with :func:`register_output_curvature`.

Labels are checked when they are concrete (outside ``jit``): a class label outside ``[0, k)`` or a
logistic label outside {-1, +1} is a ValueError, not a silent NaN or a wrong class.

Example:
  >>> import jax.numpy as jnp
  >>> from lsgeo import losses
  >>> logits, labels = jnp.array([[2.0, 0.0], [0.0, 1.0]]), jnp.array([0, 1])
  >>> float(losses.accuracy(logits, labels))
  1.0
  >>> losses.output_hessians(losses.softmax_cross_entropy, logits, labels).shape
  (2, 2, 2)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lsgeo.validation import check_class_labels, check_sign_labels

Loss = Callable[[jax.Array, jax.Array], jax.Array]

__all__ = [
    "squared_loss",
    "logistic_loss",
    "softmax_cross_entropy",
    "accuracy",
    "as_matrix",
    "OutputCurvature",
    "register_output_curvature",
    "output_hessians",
    "output_hessian_factors",
]


def as_matrix(outputs: jax.Array) -> jax.Array:
    """Outputs as ``[n, k]`` (scalar outputs ``[n]`` become ``[n, 1]``)."""
    return outputs[:, None] if outputs.ndim == 1 else outputs


def squared_loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """1/(2n) sum_i ||y_i - phi_i||^2; ``targets`` has the shape of ``outputs``."""
    if outputs.shape != targets.shape:
        raise ValueError(f"targets must have the shape of outputs {outputs.shape}, got {targets.shape}")
    diff = as_matrix(outputs - targets)
    return 0.5 * jnp.mean(jnp.sum(jnp.square(diff), axis=-1))


def _scalar_outputs_and_labels(outputs, labels, what: str):
    """``(phi [n], y [n])`` from scalar outputs ``[n]`` / ``[n, 1]`` and labels ``[n]`` / ``[n, 1]``, or a
    ValueError naming the argument whose shape is wrong (static shapes: checked under ``jit`` too)."""
    shape, label_shape = tuple(jnp.shape(outputs)), tuple(jnp.shape(labels))
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ValueError(f"outputs of {what} must be scalar predictions of shape (n,) or (n, 1), got {shape}")
    n = shape[0]
    if label_shape not in ((n,), (n, 1)):
        raise ValueError(f"labels must have shape ({n},) or ({n}, 1), one per output of shape {shape}; got {label_shape}")
    return jnp.reshape(outputs, (n,)), jnp.reshape(labels, (n,))


def logistic_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """1/n sum_i log(1 + exp(-y_i phi_i)) with labels y_i in {-1, +1}; outputs ``[n]`` or ``[n, 1]``."""
    phi, y = _scalar_outputs_and_labels(outputs, labels, "logistic_loss")
    check_sign_labels(labels)
    return jnp.mean(jax.nn.softplus(-y * phi))


def softmax_cross_entropy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """1/n sum_i (logsumexp(phi_i) - phi_i[y_i]) with integer labels ``[n]`` in ``[0, k)``; outputs ``[n, k]``.

    Labels outside ``[0, k)`` are a ValueError when they are concrete, and make the loss NaN when they are traced
    (under ``jit``, inside an operator's microbatch loop, from a data source): a label of -1 or k would otherwise
    index a wrong class and give a finite, wrong value (and every curvature estimate built on it)."""
    if labels.ndim != 1 or labels.shape[0] != outputs.shape[0]:
        raise ValueError(f"labels must be integers of shape ({outputs.shape[0]},), got {labels.shape}")
    check_class_labels(labels, outputs.shape[-1])
    per_example = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    poison = jnp.where((labels >= 0) & (labels < outputs.shape[-1]), 1.0, jnp.nan).astype(per_example.dtype)
    return jnp.mean(per_example * poison)  # a factor, not a where: derivatives of every order are NaN too


def accuracy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of correct predictions: argmax for ``[n, k]`` logits with integer labels,
    sign agreement for scalar outputs with labels in {-1, +1}."""
    if jnp.ndim(outputs) == 2 and outputs.shape[-1] > 1:
        if jnp.shape(labels) != (outputs.shape[0],):
            raise ValueError(
                f"labels must be integer classes of shape ({outputs.shape[0]},) for outputs {tuple(outputs.shape)} "
                f"(one label per row), got shape {tuple(jnp.shape(labels))}"
            )
        return jnp.mean(jnp.argmax(outputs, axis=-1) == labels)
    phi, y = _scalar_outputs_and_labels(outputs, labels, "accuracy")
    return jnp.mean(jnp.sign(phi) == jnp.sign(y))


class OutputCurvature(NamedTuple):
    """Closed forms of the per-example output Hessians of one loss.

    Attributes:
      hessians: ``(phi [n, k], targets) -> H [n, k, k]``.
      factors: ``(phi [n, k], targets) -> B [n, k, r]`` with H_i = B_i B_i^T (positive semidefinite H_i).
    """

    hessians: Callable[[jax.Array, jax.Array], jax.Array]
    factors: Callable[[jax.Array, jax.Array], jax.Array]


_REGISTRY: dict[Callable, OutputCurvature] = {}


def register_output_curvature(loss: Loss, *, hessians, factors) -> Loss:
    """Registers the closed-form output Hessians H_i and factors B_i (H_i = B_i B_i^T) of ``loss``.

    Both functions take the predictions as ``[n, k]`` and the targets. Returns ``loss``. The generic
    fallback (``vmap(jax.hessian)``) gives the same values; this is for speed (O(n k^2) instead of k
    backward passes per example) and for losses that do not trace cheaply.
    """
    _REGISTRY[loss] = OutputCurvature(hessians, factors)
    return loss


def _closed_form(loss: Loss) -> OutputCurvature | None:
    seen = set()
    while loss is not None and id(loss) not in seen:
        seen.add(id(loss))
        try:
            if loss in _REGISTRY:
                return _REGISTRY[loss]
        except TypeError:  # unhashable callable
            return None
        loss = getattr(loss, "__wrapped__", None)
    return None


def _identity_blocks(phi, targets):
    n, k = phi.shape
    return jnp.broadcast_to(jnp.eye(k, dtype=phi.dtype), (n, k, k))


def _logistic_hessians(phi, labels):
    s = jax.nn.sigmoid(labels.reshape(phi.shape[0]) * phi[:, 0])
    return (s * (1.0 - s))[:, None, None]


def _logistic_factors(phi, labels):
    return jnp.sqrt(_logistic_hessians(phi, labels))


def _cross_entropy_hessians(phi, labels):
    p = jax.nn.softmax(phi, axis=-1)
    return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]


def _cross_entropy_factors(phi, labels):
    p = jax.nn.softmax(phi, axis=-1)
    q = jnp.sqrt(p)
    return jax.vmap(jnp.diag)(q) - p[:, :, None] * q[:, None, :]  # B B^T = diag(p) - p p^T


register_output_curvature(squared_loss, hessians=_identity_blocks, factors=_identity_blocks)
register_output_curvature(logistic_loss, hessians=_logistic_hessians, factors=_logistic_factors)
register_output_curvature(softmax_cross_entropy, hessians=_cross_entropy_hessians, factors=_cross_entropy_factors)


def output_hessians(loss: Loss, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example Hessians H_i = d^2 l(phi_i, y_i) / d phi_i^2, shape ``[n, k, k]``.

    ``D2L(phi) = blockdiag(H_i) / n``. The registered closed form (cost O(n k^2)); for any other
    mean-over-examples ``loss``, ``vmap`` of ``jax.hessian`` of ``loss`` evaluated on one example.
    """
    phi = as_matrix(outputs)
    closed = _closed_form(loss)
    if closed is not None:
        return closed.hessians(phi, targets)
    scalar = outputs.ndim == 1

    def one(phi_i, y_i):
        o = phi_i[0][None] if scalar else phi_i[None]
        return loss(o, y_i[None])

    return jax.vmap(jax.hessian(one))(phi, targets)


def output_hessian_factors(loss: Loss, outputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``(B, signs)`` with H_i = B_i diag(signs_i) B_i^T, shapes ``[n, k, r]`` and ``[n, r]``.

    ``signs`` is None when every H_i is positive semidefinite (the registered closed forms: convex
    losses); otherwise ``B_i`` and ``signs_i`` come from ``eigh(H_i)`` (B = U sqrt|lambda|).
    Used by the probe estimate of the Gauss-Newton trace, E ||J^T B z||^2 = tr(J^T H J).
    """
    phi = as_matrix(outputs)
    closed = _closed_form(loss)
    if closed is not None:
        return closed.factors(phi, targets), None
    h = output_hessians(loss, outputs, targets)
    evals, evecs = jnp.linalg.eigh(0.5 * (h + jnp.swapaxes(h, -1, -2)))
    return evecs * jnp.sqrt(jnp.abs(evals))[:, None, :], jnp.sign(evals)
