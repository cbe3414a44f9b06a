"""The exact trace and diagonal of the Gauss-Newton matrix, from per-example Jacobians: the one implementation
behind ``GaussNewton.exact_trace`` / ``exact_diagonal`` and ``lsgeo.risk.gauss_newton_trace`` / ``_diagonal``.

With D2L = blockdiag(H_i) / n (a mean loss), G = 1/n sum_i J_i^T H_i J_i, so

    tr G = 1/n sum_i tr(H_i J_i J_i^T),       diag G = 1/n sum_i diag(J_i^T H_i J_i).

The trace contracts the per-example Gram blocks J_i J_i^T (``lsgeo.per_example.per_example_grams``: ghost norms
for dense layers) with the output Hessians H_i, by parameter group; the diagonal squares the VJPs of the
one-example predictor with the columns of the factors H_i = B_i diag(s_i) B_i^T (BackPACK's ``DiagGGNExact``,
Dangel, Kunstner, Hennig 2020). Both are example-weighted means over the objective's microbatches
(``objective.map``), exact whatever the cut.

Cost: about k backward passes of the one-example model per example. Memory: one chunk of per-example Grams or
gradients (``examples_per_chunk``; automatic within ``lsgeo.dataplan.MEMORY_BUDGET_BYTES``).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lsgeo import dataplan, per_example
from lsgeo import groups as groups_lib
from lsgeo import losses as losses_lib
from lsgeo.objective import check_scalar, compiled

__all__ = ["exact_trace_by_group", "exact_diagonal"]

_DIAGONAL_BUDGET_FLOATS = dataplan.MEMORY_BUDGET_BYTES // 4


def _scalar_outputs(predict, params, x) -> bool:
    return len(jax.eval_shape(predict, params, x).shape) == 1


def _loss_value(loss, outputs, y):
    value = loss(outputs, y)
    check_scalar(value, "loss", "the mean over examples; reduce a per-example loss with jnp.mean")
    return value


def _trace_on(predict, loss, groups, method, examples_per_chunk, params, batch):
    """Per-group mean over the batch of tr(H_i J_{i,g} J_{i,g}^T), and L at the predictions."""
    x, y = batch
    grams, _, phi = per_example.per_example_grams(predict, params, x, groups=groups, method=method,
                                                  examples_per_chunk=examples_per_chunk)
    n = phi.shape[0]
    outputs = phi[:, 0] if _scalar_outputs(predict, params, x) else phi
    value = _loss_value(loss, outputs, y)
    hessians = losses_lib.output_hessians(loss, outputs, y).astype(grams.dtype)  # [n, k, k]
    return jnp.einsum("nkl,ngkl->g", hessians, grams) / n, value


@compiled(static_argnums=(1, 2, 3))
def _trace_jit(risk, groups, method, examples_per_chunk, params):
    return risk.map(lambda p, mb: _trace_on(risk.predict, risk.loss, groups, method, examples_per_chunk, p, mb), params)


def exact_trace_by_group(risk, params, *, groups=None, method="fast", examples_per_chunk=None):
    """``({group: 1/n sum_i tr(H_i J_{i,g} J_{i,g}^T)}, R(w))`` of a ``Risk`` at ``params`` (placed by the caller)."""
    _, names = groups_lib.group_ids(params, groups)
    per_group, value = _trace_jit(risk, groups, method, examples_per_chunk, params)
    return {name: per_group[g] for g, name in enumerate(names)}, value


def _diagonal_on(predict, loss, examples_per_chunk, params, batch):
    """Mean over the batch of diag(J_i^T H_i J_i), a ``lax.scan`` over chunks of examples (the last chunk
    padded with copies of the last example, masked out)."""
    x, y = batch
    n = int(np.shape(jax.tree_util.tree_leaves(x)[0])[0])
    single = per_example.single_example(predict)
    scalar = _scalar_outputs(predict, params, x)
    flat, unravel = ravel_pytree(params)
    k = int(np.prod(jax.eval_shape(predict, params, x).shape[1:], dtype=np.int64))
    chunk = int(min(examples_per_chunk or max(1, _DIAGONAL_BUDGET_FLOATS // max(1, k * flat.shape[0])), n))
    steps = -(-n // chunk)
    pad = steps * chunk - n

    def one(xi, yi):
        phi, vjp_fn = jax.vjp(lambda p: single(p, xi), params)
        outputs = phi if scalar else phi[None]
        factors, signs = losses_lib.output_hessian_factors(loss, outputs, yi[None])
        columns = factors[0].T.astype(phi.dtype)  # [r, k]
        (grads,) = jax.vmap(vjp_fn)(columns)  # leaves [r, ...]: J_i^T b_ic
        rows = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)  # [r, m]
        weights = jnp.ones(rows.shape[0], rows.dtype) if signs is None else signs[0].astype(rows.dtype)
        return jnp.einsum("r,rm->m", weights, jnp.square(rows))

    def padded(a):
        a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a
        return a.reshape(steps, chunk, *a.shape[1:])

    xs = jax.tree_util.tree_map(padded, (x, y))
    mask = (jnp.arange(steps * chunk) < n).reshape(steps, chunk)

    def step(total, inputs):
        (xc, yc), valid = inputs
        d = jax.vmap(one)(xc, yc)
        return total + jnp.sum(jnp.where(valid[:, None], d, 0.0), axis=0), None

    total, _ = jax.lax.scan(step, jnp.zeros_like(flat), (xs, mask))
    return unravel(total / n)


@compiled(static_argnums=(1,))
def _diagonal_jit(risk, examples_per_chunk, params):
    return risk.map(lambda p, mb: _diagonal_on(risk.predict, risk.loss, examples_per_chunk, p, mb), params)


def exact_diagonal(risk, params, *, examples_per_chunk=None):
    """``diag(G)`` of a ``Risk`` at ``params``, a pytree shaped like ``params``."""
    return _diagonal_jit(risk, examples_per_chunk, params)
