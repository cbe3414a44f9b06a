"""Losses L(phi) on the n predictions, each the mean of a per-example loss l(phi_i, y_i).

The paper's L (Orvieto et al. 2023, Section 2):
  squared:   L(phi) = 1/(2n) sum_i ||y_i - phi_i||^2
  logistic:  L(phi) = 1/n sum_i log(1 + exp(-y_i phi_i)),   y_i in {-1, +1}
  softmax cross-entropy with integer labels: L(phi) = 1/n sum_i (logsumexp(phi_i) - phi_i[y_i]).

Because L is a mean, its Hessian is block diagonal: D2L(phi) = blockdiag(H_1, ..., H_n) / n with
H_i the k x k Hessian of l at phi_i. ``output_hessians`` returns the H_i (closed forms for the
three losses above, ``vmap(hessian)`` of the one-example loss for any other mean loss).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Loss = Callable[[jax.Array, jax.Array], jax.Array]

__all__ = [
    "squared_loss",
    "logistic_loss",
    "softmax_cross_entropy",
    "output_hessians",
    "accuracy",
    "as_matrix",
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


def logistic_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """1/n sum_i log(1 + exp(-y_i phi_i)) with labels y_i in {-1, +1}; outputs ``[n]`` or ``[n, 1]``."""
    phi = outputs.reshape(outputs.shape[0])
    return jnp.mean(jax.nn.softplus(-labels.reshape(phi.shape) * phi))


def softmax_cross_entropy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """1/n sum_i (logsumexp(phi_i) - phi_i[y_i]) with integer labels ``[n]``; outputs ``[n, k]``."""
    if labels.ndim != 1 or labels.shape[0] != outputs.shape[0]:
        raise ValueError(f"labels must be integers of shape ({outputs.shape[0]},), got {labels.shape}")
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))


def accuracy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of correct predictions: argmax for ``[n, k]`` logits with integer labels,
    sign agreement for scalar outputs with labels in {-1, +1}."""
    if outputs.ndim == 2 and outputs.shape[-1] > 1:
        return jnp.mean(jnp.argmax(outputs, axis=-1) == labels)
    phi = outputs.reshape(outputs.shape[0])
    return jnp.mean(jnp.sign(phi) == jnp.sign(labels.reshape(phi.shape)))


def _squared_hessians(phi, targets):
    n, k = phi.shape
    return jnp.broadcast_to(jnp.eye(k, dtype=phi.dtype), (n, k, k))


def _logistic_hessians(phi, labels):
    s = jax.nn.sigmoid(labels.reshape(phi.shape[0]) * phi[:, 0])
    return (s * (1.0 - s))[:, None, None]


def _cross_entropy_hessians(phi, labels):
    p = jax.nn.softmax(phi, axis=-1)
    return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]


_CLOSED_FORMS = {
    squared_loss: _squared_hessians,
    logistic_loss: _logistic_hessians,
    softmax_cross_entropy: _cross_entropy_hessians,
}


def output_hessians(loss: Loss, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example Hessians H_i = d^2 l(phi_i, y_i) / d phi_i^2, shape ``[n, k, k]``.

    ``D2L(phi) = blockdiag(H_i) / n``. Closed forms for the losses of this module (cost O(n k^2));
    for any other mean-over-examples ``loss``, ``vmap`` of ``jax.hessian`` of ``loss`` evaluated on
    one example (cost O(n k^2) autodiff).
    """
    phi = as_matrix(outputs)
    closed = _CLOSED_FORMS.get(loss)
    if closed is not None:
        return closed(phi, targets)
    scalar = outputs.ndim == 1

    def one(phi_i, y_i):
        o = phi_i[0][None] if scalar else phi_i[None]
        return loss(o, y_i[None])

    return jax.vmap(jax.hessian(one))(phi, targets)
