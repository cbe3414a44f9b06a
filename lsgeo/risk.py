"""The risk R(w) = L(Phi(w)) and its noise-injected versions (Orvieto et al., AISTATS 2023).

  R(w)               = L(Phi(w))                                            (Eq. 1)
  R_sigma(w)         = E_eps[ L(Phi(w + sigma eps)) ]                        (Eq. 2)
  R~_sigma(w)        = 1/M sum_j E_eps[ L(Phi(w + sigma sqrt(M) eps_j)) ]    (layer-wise, Sections 3.2, 4)
  R_sigma^(eff)(w)   = R(w) + sigma^2/2 tr(D2L(Phi) DPhi DPhi^T)             (second-order expansion)

The Gauss-Newton trace tr(D2L(Phi) DPhi DPhi^T) is the part of tr(D2R) that does not vanish at an
interpolating solution; with D2L = blockdiag(H_i)/n it equals 1/n sum_i tr(H_i J_i J_i^T), where
J_i = d phi_i / d w and H_i is the k x k output Hessian of example i (see :mod:`lsgeo.per_example`).

Model contract: ``predict(params, x) -> [n, k] or [n]``, ``loss(outputs, y) -> scalar`` (a mean over
examples), ``batch = (x, y)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lsgeo import groups as groups_lib
from lsgeo import losses as losses_lib
from lsgeo import per_example
from lsgeo.perturbation import MODES, perturbation
from lsgeo.validation import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_sigma,
)

__all__ = ["risk", "perturbed_risk", "gauss_newton_trace", "gauss_newton_trace_by_layer", "effective_risk"]


def risk(predict, loss, params, batch):
    """R(w) = L(Phi(w)). Cost: one forward pass."""
    x, y = batch
    return loss(predict(params, x), y)


def perturbed_risk(
    predict,
    loss,
    params,
    batch,
    sigma,
    key,
    *,
    num_samples=1,
    mode="full",
    groups=None,
    scale_by_num_groups=True,
    chunk_size=16,
):
    """Monte Carlo estimate of R_sigma (``mode="full"``) or of the layer-wise R~_sigma.

    ``mode="full"``: mean over ``num_samples`` draws of L(Phi(w + sigma eps)).
    ``mode="layerwise"``: for each draw, the expectation over the perturbed group j is taken exactly,
    i.e. the mean over all M groups of L(Phi(w + sigma sqrt(M) eps_j)) with eps_j on group j only.

    Unbiased for R_sigma / R~_sigma. Cost: ``num_samples`` (times M for layer-wise) forward passes,
    evaluated ``chunk_size`` at a time with ``lax.map`` so memory stays bounded.
    """
    check_choice(mode, "mode", MODES)
    check_sigma(sigma)
    check_positive_int(num_samples, "num_samples")
    x, y = batch
    keys = jax.random.split(key, num_samples)

    if mode == "full":

        def one(k):
            xi = perturbation(k, params, sigma, mode="full")
            return loss(predict(optax.tree.add(params, xi), x), y)

        values = jax.lax.map(one, keys, batch_size=min(chunk_size, num_samples))
        return jnp.mean(values)

    num_groups = len(groups_lib.group_names(params, groups))
    group_index = jnp.tile(jnp.arange(num_groups), num_samples)
    draw_keys = jnp.repeat(keys, num_groups, axis=0)

    def one_group(args):
        k, j = args
        xi = perturbation(
            k, params, sigma, mode="layerwise", group=j, groups=groups, scale_by_num_groups=scale_by_num_groups
        )
        return loss(predict(optax.tree.add(params, xi), x), y)

    values = jax.lax.map(one_group, (draw_keys, group_index), batch_size=min(chunk_size, num_samples * num_groups))
    return jnp.mean(values)


# --------------------------------------------------------------------------------------------
# Gauss-Newton trace and the effective risk


def _exact_gn(predict, loss, params, batch, groups, method, chunk_size):
    """Exact per-group 1/n sum_i tr(H_i J_{i,g} J_{i,g}^T) and the predictions. Returns (dict, outputs)."""
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    _, names = groups_lib.group_ids(params, groups)
    per_group, outputs = _exact_gn_jit(predict, loss, groups, method, chunk_size, params, batch)
    return {name: per_group[g] for g, name in enumerate(names)}, outputs


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _exact_gn_jit(predict, loss, groups, method, chunk_size, params, batch):
    x, y = batch
    grams, _, phi = per_example.per_example_grams(
        predict, params, x, groups=groups, method=method, chunk_size=chunk_size
    )
    n = phi.shape[0]
    outputs = phi[:, 0] if _scalar_outputs(predict, params, x) else phi
    hessians = losses_lib.output_hessians(loss, outputs, y).astype(grams.dtype)  # [n, k, k]
    return jnp.einsum("nkl,ngkl->g", hessians, grams) / n, outputs


def _scalar_outputs(predict, params, x) -> bool:
    return len(jax.eval_shape(predict, params, x).shape) == 1


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _probe_gn(predict, loss, params, batch, key, num_probes, probe_chunk):
    """Unbiased estimate of tr(D2L J J^T): E_z ||J^T D2L^{1/2} z||^2 with z ~ N(0, I_{nk})."""
    x, y = batch
    outputs, vjp_fn = jax.vjp(lambda p: predict(p, x), params)
    phi = losses_lib.as_matrix(outputs)
    n, k = phi.shape
    factors, signs = losses_lib.output_hessian_factors(loss, outputs, y)
    factors = factors.astype(phi.dtype)

    def one(kp):
        z = jax.random.normal(kp, (n, k), phi.dtype)
        u = jnp.einsum("nkl,nl->nk", factors, z)
        if signs is None:
            (g,) = vjp_fn(u.reshape(outputs.shape))
            return optax.tree.norm(g, squared=True)
        us = jnp.einsum("nkl,nl->nk", factors, signs.astype(phi.dtype) * z)
        (g,) = vjp_fn(u.reshape(outputs.shape))
        (gs,) = vjp_fn(us.reshape(outputs.shape))
        return optax.tree.vdot(g, gs)

    keys = jax.random.split(key, num_probes)
    values = jax.lax.map(one, keys, batch_size=min(probe_chunk, num_probes))
    return jnp.mean(values) / n, outputs


def _check_gn_args(key, num_probes, method):
    check_nonnegative_int(num_probes, "num_probes")
    check_choice(method, "method", per_example.METHODS)
    if num_probes > 0 and key is None:
        raise ValueError("key must be a PRNG key when num_probes > 0 (the probe estimate is random)")


def _gn_trace_and_outputs(predict, loss, params, batch, key, num_probes, chunk_size, method, probe_chunk):
    _check_gn_args(key, num_probes, method)
    if num_probes == 0:
        per_group, outputs = _exact_gn(predict, loss, params, batch, None, method, chunk_size)
        return sum(per_group.values()), outputs
    return _probe_gn(predict, loss, params, batch, key, num_probes, probe_chunk)


def gauss_newton_trace(
    predict, loss, params, batch, *, key=None, num_probes=0, chunk_size=None, method="fast", probe_chunk=8
):
    """tr(D2L(Phi(w)) DPhi(w) DPhi(w)^T), the Gauss-Newton part of tr(D2R) (Orvieto et al. 2023, Section 2).

    With D2L = blockdiag(H_i) / n (a mean loss) this is 1/n sum_i tr(H_i J_i J_i^T).

    ``num_probes == 0`` (exact): the per-example Gram blocks G_i = J_i J_i^T are formed k at a time
    (:func:`lsgeo.per_example.per_example_grams`, ghost norms for dense layers) and contracted with the
    output Hessians H_i (:func:`lsgeo.losses.output_hessians`). Cost: about k backward passes of the
    one-example model per example; memory O(chunk_size k width) (plus O(chunk_size k m) for leaves
    outside the structured fast path); ``method="generic"`` forces per-example VJPs for every leaf.

    ``num_probes > 0`` (unbiased estimate): with H_i = B_i B_i^T (closed-form factors for the squared,
    logistic and cross-entropy losses; ``eigh`` otherwise) and z ~ N(0, I) in output space [n, k],
    tr(D2L J J^T) = E ||J^T u||^2 / n where u_i = B_i z_i. Cost: one forward pass and one full-batch
    VJP per probe (two for a loss whose output Hessian may be indefinite), ``probe_chunk`` probes
    vmapped at a time. Variance: 2 ||B^T J J^T B||_F^2 / (n^2 num_probes).

    Args:
      predict, loss, params, batch: the model contract (``batch = (x, y)``).
      key: PRNG key, required when ``num_probes > 0``.
      num_probes: 0 for the exact value, else the number of Gaussian probes.
      chunk_size: examples per chunk on the exact path (``None``: automatic).
      method: ``"fast"`` or ``"generic"`` (exact path only).
      probe_chunk: probes evaluated in parallel.

    Returns:
      A scalar.
    """
    check_positive_int(probe_chunk, "probe_chunk")
    value, _ = _gn_trace_and_outputs(predict, loss, params, batch, key, num_probes, chunk_size, method, probe_chunk)
    return value


def gauss_newton_trace_by_layer(predict, loss, params, batch, *, groups=None, chunk_size=None, method="fast"):
    """Exact Gauss-Newton trace split by parameter group: {g: 1/n sum_i tr(H_i J_{i,g} J_{i,g}^T)}.

    The values sum to :func:`gauss_newton_trace`. sigma^2/2 times entry g is the second-order effect of
    noise on group g alone; the layer-wise noise of Section 4 (sigma sqrt(M) on one of M groups) has
    the same total. ``groups``: ``None`` (top-level modules), ``"leaf"`` or a callable on the leaf
    path. Cost and memory as the exact :func:`gauss_newton_trace`.
    """
    check_choice(method, "method", per_example.METHODS)
    per_group, _ = _exact_gn(predict, loss, params, batch, groups, method, chunk_size)
    return per_group


def effective_risk(
    predict, loss, params, batch, sigma, *, key=None, num_probes=0, chunk_size=None, method="fast", probe_chunk=8
):
    """R_sigma^(eff)(w) = R(w) + sigma^2/2 tr(D2L(Phi) DPhi DPhi^T) (Orvieto et al. 2023, Section 2).

    The second-order expansion of R_sigma when L is (locally) quadratic in Phi, dropping the term
    sigma^2/2 <DL, tr D2Phi> that vanishes in expectation at interpolation. The Gauss-Newton trace is
    exact for ``num_probes == 0`` and an unbiased estimate otherwise (see :func:`gauss_newton_trace`);
    R reuses the forward pass. ``sigma``: a finite number >= 0.
    """
    check_sigma(sigma)
    check_positive_int(probe_chunk, "probe_chunk")
    trace, outputs = _gn_trace_and_outputs(
        predict, loss, params, batch, key, num_probes, chunk_size, method, probe_chunk
    )
    _, y = batch
    return loss(outputs, y) + 0.5 * jnp.square(sigma) * trace
