"""The risk R(w) = L(Phi(w)) and its noise-injected versions (Orvieto et al., AISTATS 2023).

  R(w)               = L(Phi(w))                                            (Eq. 1)
  R_sigma(w)         = E_eps[ L(Phi(w + sigma eps)) ]                        (Eq. 2)
  R~_sigma(w)        = 1/M sum_j E_eps[ L(Phi(w + sigma sqrt(M) eps_j)) ]    (layer-wise, Sections 3.2, 4)
  R_sigma^(eff)(w)   = R(w) + sigma^2/2 tr(D2L(Phi) DPhi DPhi^T)             (second-order expansion)

The Gauss-Newton trace tr(D2L(Phi) DPhi DPhi^T) is the part of tr(D2R) that does not vanish at an
interpolating solution; with D2L = blockdiag(H_i)/n it equals 1/n sum_i tr(H_i J_i J_i^T), where
J_i = d phi_i / d w and H_i is the k x k output Hessian of example i (see :mod:`lsgeo.per_example`).
Its diagonal, diag(J^T D2L J) = 1/n sum_i diag(J_i^T H_i J_i), is ``gauss_newton_diagonal``.

Model contract: ``predict(params, x) -> [n, k] or [n]``, ``loss(outputs, y) -> scalar`` (a mean over
examples), ``batch = (x, y)``.

Data sets larger than a batch: every function takes ``microbatch_size`` (and ``devices``); the value is
then the exact data-set value, the example-weighted mean over microbatches computed with ``lax`` loops in
the memory of one microbatch and sharded over the devices (:mod:`lsgeo.dataplan`). This needs L to be a
mean over independent examples: a BatchNorm model must be evaluated in evaluation mode (its statistics
bound into ``predict``, ``lsgeo.models.make_predict(model, model_state)``).

Example:
  >>> import jax.numpy as jnp
  >>> from lsgeo import losses, risk
  >>> predict = lambda w, x: x @ w
  >>> x, y = jnp.array([[1.0], [2.0], [3.0]]), jnp.array([[1.0], [2.0], [2.0]])
  >>> float(risk.risk(predict, losses.squared_loss, jnp.ones((1, 1)), (x, y), microbatch_size=2))
  0.1666...
  >>> float(risk.gauss_newton_trace(predict, losses.squared_loss, jnp.ones((1, 1)), (x, y)))  # mean x^2
  4.666...
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lsgeo import groups as groups_lib
from lsgeo import losses as losses_lib
from lsgeo import dataplan, per_example
from lsgeo.objective import mean_risk
from lsgeo.perturbation import MODES, perturbation
from lsgeo.validation import (
    check_callable,
    check_choice,
    check_float_params,
    check_loss_targets,
    check_nonnegative_int,
    check_positive_int,
    check_sigma,
)

__all__ = [
    "risk",
    "perturbed_risk",
    "gauss_newton_trace",
    "gauss_newton_trace_by_layer",
    "gauss_newton_diagonal",
    "effective_risk",
]

_DIAGONAL_BUDGET_FLOATS = dataplan.MEMORY_BUDGET_BYTES // 4


def _check_model(predict, loss, params, batch, microbatch_size, devices):
    """The checks every entry point runs; returns the microbatch plan."""
    check_callable(predict, "predict")
    check_callable(loss, "loss")
    check_float_params(params)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch must be a pair (x, y), got {type(batch).__name__}")
    plan = dataplan.in_memory_plan(batch, microbatch_size, devices=devices)
    check_loss_targets(predict, loss, params, batch)
    dataplan.check_mean_over_examples(mean_risk(predict, loss), params, batch, plan, name="loss(predict(...))")
    return plan


def _loss(loss, outputs, y):
    value = loss(outputs, y)
    if jnp.ndim(value) != 0:
        raise ValueError(
            f"loss must return a scalar (the mean over examples), got shape {jnp.shape(value)}; "
            f"reduce a per-example loss with jnp.mean"
        )
    return value


def _risk_on(predict, loss, params, batch):
    x, y = batch
    return _loss(loss, predict(params, x), y)


def risk(predict, loss, params, batch, *, microbatch_size: int | None = None, devices: Sequence | None = None):
    """R(w) = L(Phi(w)). Cost: one forward pass (per microbatch with ``microbatch_size``, the exact
    data-set value in the memory of one microbatch, see :mod:`lsgeo.dataplan`).

    Raises:
      TypeError: ``predict`` or ``loss`` not callable. ValueError: ``loss`` not scalar, integer
      ``params``, ``batch`` not a pair (x, y), an empty batch, a bad ``microbatch_size``.
    """
    plan = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, batch = plan.place(params, batch)
    if plan.whole:
        return _risk_on(predict, loss, params, batch)
    return _risk_jit(predict, loss, plan, params, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _risk_jit(predict, loss, plan, params, batch):
    return dataplan.reduce(lambda p, mb: _risk_on(predict, loss, p, mb), params, batch, plan)


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
    draws_per_pass=16,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """Monte Carlo estimate of R_sigma (``mode="full"``) or of the layer-wise R~_sigma.

    ``mode="full"``: mean over ``num_samples`` draws of L(Phi(w + sigma eps)).
    ``mode="layerwise"``: for each draw, the expectation over the perturbed group j is taken exactly,
    i.e. the mean over all M groups of L(Phi(w + sigma sqrt(M) eps_j)) with eps_j on group j only.

    Unbiased for R_sigma / R~_sigma. Cost: ``num_samples`` (times M for layer-wise) forward passes,
    evaluated ``draws_per_pass`` at a time with ``lax.map`` so memory stays bounded. With
    ``microbatch_size`` every microbatch sees the same draws, so the value equals the single-batch one.
    """
    check_choice(mode, "mode", MODES)
    check_sigma(sigma)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(draws_per_pass, "draws_per_pass")
    plan = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, batch, key = plan.place(params, batch, key)
    num_groups = len(groups_lib.group_names(params, groups)) if mode == "layerwise" else 1
    return _perturbed_risk(predict, loss, mode, groups, bool(scale_by_num_groups), num_samples, num_groups,
                           draws_per_pass, plan, params, batch, sigma, key)


@functools.partial(jax.jit, static_argnums=tuple(range(9)))
def _perturbed_risk(predict, loss, mode, groups, scale, num_samples, num_groups, draws_per_pass, plan, params, batch,
                    sigma, key):
    keys = jax.random.split(key, num_samples)

    def on_batch(ops, mb):
        params, sigma, keys = ops
        x, y = mb

        if mode == "full":

            def one(k):
                xi = perturbation(k, params, sigma, mode="full")
                return _loss(loss, predict(optax.tree.add(params, xi), x), y)

            return jnp.mean(jax.lax.map(one, keys, batch_size=min(draws_per_pass, num_samples)))

        group_index = jnp.tile(jnp.arange(num_groups), num_samples)
        draw_keys = jnp.repeat(keys, num_groups, axis=0)

        def one_group(args):
            k, j = args
            xi = perturbation(k, params, sigma, mode="layerwise", group=j, groups=groups, scale_by_num_groups=scale)
            return _loss(loss, predict(optax.tree.add(params, xi), x), y)

        values = jax.lax.map(one_group, (draw_keys, group_index), batch_size=min(draws_per_pass, num_samples * num_groups))
        return jnp.mean(values)

    return dataplan.reduce(on_batch, (params, sigma, keys), batch, plan)


def _scalar_outputs(predict, params, x) -> bool:
    return len(jax.eval_shape(predict, params, x).shape) == 1


def _exact_gn_on(predict, loss, groups, method, examples_per_chunk, params, batch):
    """Per-group mean over the batch of tr(H_i J_{i,g} J_{i,g}^T), and L at the predictions."""
    x, y = batch
    grams, _, phi = per_example.per_example_grams(
        predict, params, x, groups=groups, method=method, examples_per_chunk=examples_per_chunk
    )
    n = phi.shape[0]
    outputs = phi[:, 0] if _scalar_outputs(predict, params, x) else phi
    value = _loss(loss, outputs, y)
    hessians = losses_lib.output_hessians(loss, outputs, y).astype(grams.dtype)  # [n, k, k]
    return jnp.einsum("nkl,ngkl->g", hessians, grams) / n, value


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _exact_gn_jit(predict, loss, groups, method, examples_per_chunk, plan, params, batch):
    return dataplan.reduce(
        lambda p, mb: _exact_gn_on(predict, loss, groups, method, examples_per_chunk, p, mb), params, batch, plan
    )


def _exact_gn(predict, loss, params, batch, groups, method, examples_per_chunk, plan):
    """Exact per-group 1/n sum_i tr(H_i J_{i,g} J_{i,g}^T) and R. Returns (dict, R)."""
    if examples_per_chunk is not None:
        check_positive_int(examples_per_chunk, "examples_per_chunk")
    _, names = groups_lib.group_ids(params, groups)
    per_group, value = _exact_gn_jit(predict, loss, groups, method, examples_per_chunk, plan, params, batch)
    return {name: per_group[g] for g, name in enumerate(names)}, value


def _probe_gn_on(predict, loss, num_probes, probes_per_pass, params, batch, key):
    """Unbiased estimate of the mean over the batch of tr(H_i J_i J_i^T): E_z ||J^T D2L^{1/2} z||^2 with
    z ~ N(0, I_{nk}); and L at the predictions."""
    x, y = batch
    outputs, vjp_fn = jax.vjp(lambda p: predict(p, x), params)
    value = _loss(loss, outputs, y)
    phi = losses_lib.as_matrix(outputs)
    n, k = phi.shape
    factors, signs = losses_lib.output_hessian_factors(loss, outputs, y)
    factors = factors.astype(phi.dtype)

    def one(kp):
        z = jax.random.normal(kp, (n, k), phi.dtype)
        u = jnp.einsum("nkl,nl->nk", factors, z)
        (g,) = vjp_fn(u.reshape(outputs.shape))
        if signs is None:
            return optax.tree.norm(g, squared=True)
        us = jnp.einsum("nkl,nl->nk", factors, signs.astype(phi.dtype) * z)
        (gs,) = vjp_fn(us.reshape(outputs.shape))
        return optax.tree.vdot(g, gs)

    keys = jax.random.split(key, num_probes)
    values = jax.lax.map(one, keys, batch_size=min(probes_per_pass, num_probes))
    return jnp.mean(values) / n, value


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _probe_gn(predict, loss, num_probes, probes_per_pass, plan, params, batch, key):
    return dataplan.reduce(
        lambda ops, mb: _probe_gn_on(predict, loss, num_probes, probes_per_pass, ops[0], mb, ops[1]),
        (params, key), batch, plan,
    )


def _check_gn_args(key, num_probes, method, probes_per_pass):
    check_nonnegative_int(num_probes, "num_probes")
    check_choice(method, "method", per_example.METHODS)
    check_positive_int(probes_per_pass, "probes_per_pass")
    if num_probes > 0 and key is None:
        raise ValueError("key must be a PRNG key when num_probes > 0 (the probe estimate is random)")


def _gn_trace_and_risk(predict, loss, params, batch, key, num_probes, examples_per_chunk, method, probes_per_pass, plan):
    _check_gn_args(key, num_probes, method, probes_per_pass)
    if num_probes == 0:
        per_group, value = _exact_gn(predict, loss, params, batch, None, method, examples_per_chunk, plan)
        return sum(per_group.values()), value
    return _probe_gn(predict, loss, num_probes, probes_per_pass, plan, params, batch, key)


def gauss_newton_trace(
    predict,
    loss,
    params,
    batch,
    *,
    key=None,
    num_probes=0,
    examples_per_chunk=None,
    method="fast",
    probes_per_pass=8,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """tr(D2L(Phi(w)) DPhi(w) DPhi(w)^T), the Gauss-Newton part of tr(D2R) (Orvieto et al. 2023, Section 2).

    With D2L = blockdiag(H_i) / n (a mean loss) this is 1/n sum_i tr(H_i J_i J_i^T).

    ``num_probes == 0`` (exact): the per-example Gram blocks G_i = J_i J_i^T are formed k at a time
    (:func:`lsgeo.per_example.per_example_grams`, ghost norms for dense layers) and contracted with the
    output Hessians H_i (:func:`lsgeo.losses.output_hessians`). Cost: about k backward passes of the
    one-example model per example; memory O(examples_per_chunk k width) (plus O(examples_per_chunk k m) for leaves
    outside the structured fast path); ``method="generic"`` forces per-example VJPs for every leaf.

    ``num_probes > 0`` (unbiased estimate): with H_i = B_i B_i^T (closed-form factors for the squared,
    logistic and cross-entropy losses; ``eigh`` otherwise) and z ~ N(0, I) in output space [n, k],
    tr(D2L J J^T) = E ||J^T u||^2 / n where u_i = B_i z_i. Cost: one forward pass and one full-batch
    VJP per probe (two for a loss whose output Hessian may be indefinite), ``probes_per_pass`` probes
    vmapped at a time. Variance: 2 ||B^T J J^T B||_F^2 / (n^2 num_probes).

    Args:
      predict, loss, params, batch: the model contract (``batch = (x, y)``).
      key: PRNG key, required when ``num_probes > 0``.
      num_probes: 0 for the exact value, else the number of Gaussian probes.
      examples_per_chunk: examples per chunk on the exact path (``None``: automatic).
      method: ``"fast"`` or ``"generic"`` (exact path only).
      probes_per_pass: probes evaluated in parallel.
      microbatch_size, devices: the exact data-set value by microbatches (:mod:`lsgeo.dataplan`); the
        exact trace equals the single-batch one, the probe estimate stays unbiased (every microbatch
        draws its probes from ``key``).

    Returns:
      A scalar.
    """
    plan = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, batch, key = plan.place(params, batch, key)
    value, _ = _gn_trace_and_risk(predict, loss, params, batch, key, num_probes, examples_per_chunk, method, probes_per_pass,
                                  plan)
    return value


def gauss_newton_trace_by_layer(
    predict,
    loss,
    params,
    batch,
    *,
    groups=None,
    examples_per_chunk=None,
    method="fast",
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """Exact Gauss-Newton trace split by parameter group: {g: 1/n sum_i tr(H_i J_{i,g} J_{i,g}^T)}.

    The values sum to :func:`gauss_newton_trace`. sigma^2/2 times entry g is the second-order effect of
    noise on group g alone; the layer-wise noise of Section 4 (sigma sqrt(M) on one of M groups) has
    the same total. ``groups``: ``None`` (top-level modules), ``"leaf"`` or a callable on the leaf
    path. Cost and memory as the exact :func:`gauss_newton_trace` (and its ``microbatch_size``).
    """
    check_choice(method, "method", per_example.METHODS)
    plan = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, batch = plan.place(params, batch)
    per_group, _ = _exact_gn(predict, loss, params, batch, groups, method, examples_per_chunk, plan)
    return per_group


def effective_risk(
    predict,
    loss,
    params,
    batch,
    sigma,
    *,
    key=None,
    num_probes=0,
    examples_per_chunk=None,
    method="fast",
    probes_per_pass=8,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """R_sigma^(eff)(w) = R(w) + sigma^2/2 tr(D2L(Phi) DPhi DPhi^T) (Orvieto et al. 2023, Section 2).

    The second-order expansion of R_sigma when L is (locally) quadratic in Phi, dropping the term
    sigma^2/2 <DL, tr D2Phi> that vanishes in expectation at interpolation. The Gauss-Newton trace is
    exact for ``num_probes == 0`` and an unbiased estimate otherwise (see :func:`gauss_newton_trace`);
    R reuses the forward pass. ``sigma``: a finite number >= 0. ``microbatch_size``: the data-set value
    by microbatches (:mod:`lsgeo.dataplan`).
    """
    check_sigma(sigma)
    plan = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, batch, key = plan.place(params, batch, key)
    trace, value = _gn_trace_and_risk(predict, loss, params, batch, key, num_probes, examples_per_chunk, method,
                                      probes_per_pass, plan)
    return value + 0.5 * jnp.square(sigma) * trace


def gauss_newton_diagonal(
    predict,
    loss,
    params,
    batch,
    *,
    examples_per_chunk: int | None = None,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """The exact diagonal of the Gauss-Newton matrix, diag(J^T D2L(Phi) J) = 1/n sum_i diag(J_i^T H_i J_i).

    BackPACK's ``DiagGGNExact`` (Dangel, Kunstner, Hennig 2020): with the output-Hessian factors
    H_i = B_i diag(s_i) B_i^T (:func:`lsgeo.losses.output_hessian_factors`; s_i = 1 for the convex losses
    of :mod:`lsgeo.losses`), coordinate a of the diagonal is 1/n sum_i sum_c s_ic (J_i^T b_ic)_a^2: one
    VJP of the one-example predictor per column b_ic, squared and summed. Its sum over coordinates is
    :func:`gauss_newton_trace`; it is the curvature of each weight alone (the Gauss-Newton
    approximation of diag(H), PSD for convex losses), e.g. a diagonal preconditioner or the
    per-coordinate noise sensitivity sigma^2/2 diag(...).

    Args:
      predict, loss, params, batch: the model contract (``batch = (x, y)``); examples must not interact.
      examples_per_chunk: examples per chunk (vmapped; ``None``: as many as fit ~2^26 floats of per-example
        gradients, i.e. ``2^26 / (k m)``), evaluated in a ``lax.scan``.
      microbatch_size, devices: the exact data-set value by microbatches (:mod:`lsgeo.dataplan`).

    Returns:
      A pytree shaped like ``params``.

    Cost: k backward passes of the one-example model per example (r columns of B_i; k for the losses
    above). Memory: ``examples_per_chunk k m`` (the per-example gradients of one chunk).

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import losses, risk
      >>> x, y = jnp.array([[1.0, 0.0], [1.0, 2.0]]), jnp.zeros((2, 1))
      >>> d = risk.gauss_newton_diagonal(lambda w, x: x @ w, losses.squared_loss, jnp.ones((2, 1)), (x, y))
      >>> d[:, 0].tolist()  # mean over examples of x_ia^2
      [1.0, 2.0]
    """
    plan = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, batch = plan.place(params, batch)
    if examples_per_chunk is not None:
        check_positive_int(examples_per_chunk, "examples_per_chunk")
    return _gn_diagonal(predict, loss, examples_per_chunk, plan, params, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _gn_diagonal(predict, loss, examples_per_chunk, plan, params, batch):
    return dataplan.reduce(lambda p, mb: _gn_diagonal_on(predict, loss, examples_per_chunk, p, mb), params, batch, plan)


def _gn_diagonal_on(predict, loss, examples_per_chunk, params, batch):
    """Mean over the batch of diag(J_i^T H_i J_i), a ``lax.scan`` over chunks of examples (the last chunk
    padded with copies of the last example, masked out)."""
    x, y = batch
    n = int(np.shape(jax.tree_util.tree_leaves(x)[0])[0])
    single = per_example.single_example(predict)
    scalar = _scalar_outputs(predict, params, x)
    flat, unravel = ravel_pytree(params)
    k = int(np.prod(jax.eval_shape(predict, params, x).shape[1:], dtype=np.int64))
    chunk = examples_per_chunk or max(1, _DIAGONAL_BUDGET_FLOATS // max(1, k * flat.shape[0]))
    chunk = int(min(chunk, n))
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
