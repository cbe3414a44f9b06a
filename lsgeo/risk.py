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

Every function also takes a ``lsgeo.Risk`` in place of ``predict`` (with ``loss`` and ``batch`` None: the
Risk holds them and its data plan), e.g. ``risk.gauss_newton_trace(R, params=w)``; the positional forms build one.

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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from lsgeo import groups as groups_lib
from lsgeo import losses as losses_lib
from lsgeo import per_example
from lsgeo.curvature.operators import gauss_newton_exact
from lsgeo.objective import Risk, compiled
from lsgeo.perturbation import MODES, perturbation
from lsgeo.validation import (
    check_callable,
    check_choice,
    check_key,
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

def _check_model(predict, loss, params, batch, microbatch_size, devices):
    """The ``Risk`` every entry point evaluates, checked at ``params``: ``predict`` itself when it is a ``Risk``
    (then ``loss`` and ``batch`` are None: it holds them), else ``Risk(predict, loss, batch, ...)``. The one
    place the positional forms build theirs."""
    if isinstance(predict, Risk):
        if loss is not None or batch is not None or microbatch_size is not None or devices is not None:
            raise ValueError("predict is a Risk, which holds its loss, data and plan: pass loss=None, batch=None "
                             "and no microbatch_size/devices (e.g. risk.gauss_newton_trace(R, params=w))")
        objective = predict
    else:
        check_callable(predict, "predict")
        check_callable(loss, "loss")
        objective = Risk(predict, loss, batch, microbatch_size=microbatch_size, devices=devices, data_name="batch")
    if params is None:
        raise TypeError("params must be given (a pytree of floating arrays)")
    objective.check(params)
    return objective


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


def risk(predict, loss=None, params=None, batch=None, *, microbatch_size: int | None = None, devices: Sequence | None = None):
    """R(w) = L(Phi(w)). Cost: one forward pass (per microbatch with ``microbatch_size``, the exact
    data-set value in the memory of one microbatch, see :mod:`lsgeo.dataplan`).

    Raises:
      TypeError: ``predict`` or ``loss`` not callable. ValueError: ``loss`` not scalar, integer
      ``params``, ``batch`` not a pair (x, y), an empty batch, a bad ``microbatch_size``.
    """
    r = _check_model(predict, loss, params, batch, microbatch_size, devices)
    (params,) = r.place(params)
    if r.plan.whole:
        return _risk_on(r.predict, r.loss, params, r.data)
    return _risk_jit(r, params)


@compiled
def _risk_jit(r, params):
    return r.map(lambda p, mb: _risk_on(r.predict, r.loss, p, mb), params)


def perturbed_risk(
    predict,
    loss=None,
    params=None,
    batch=None,
    sigma=None,
    key=None,
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
    check_key(key, "key")
    r = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, key = r.place(params, key)
    num_groups = len(groups_lib.group_names(params, groups)) if mode == "layerwise" else 1
    return _perturbed_risk(mode, groups, bool(scale_by_num_groups), num_samples, num_groups, draws_per_pass, r, params,
                           sigma, key)


@compiled(static_argnums=tuple(range(6)))
def _perturbed_risk(mode, groups, scale, num_samples, num_groups, draws_per_pass, r, params, sigma, key):
    predict, loss = r.predict, r.loss
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

    return r.map(on_batch, (params, sigma, keys))


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


@compiled(static_argnums=(1, 2))
def _probe_gn(r, num_probes, probes_per_pass, params, key):
    predict, loss = r.predict, r.loss
    return r.map(lambda ops, mb: _probe_gn_on(predict, loss, num_probes, probes_per_pass, ops[0], mb, ops[1]),
                 (params, key))


def _check_gn_args(key, num_probes, method, probes_per_pass):
    check_nonnegative_int(num_probes, "num_probes")
    check_choice(method, "method", per_example.METHODS)
    check_positive_int(probes_per_pass, "probes_per_pass")
    if num_probes > 0 and key is None:
        raise ValueError("key must be a PRNG key when num_probes > 0 (the probe estimate is random)")


def _gn_trace_and_risk(r, params, key, num_probes, examples_per_chunk, method, probes_per_pass):
    _check_gn_args(key, num_probes, method, probes_per_pass)
    if num_probes == 0:
        if examples_per_chunk is not None:
            check_positive_int(examples_per_chunk, "examples_per_chunk")
        per_group, value = gauss_newton_exact.exact_trace_by_group(r, params, method=method,
                                                                   examples_per_chunk=examples_per_chunk)
        return sum(per_group.values()), value
    return _probe_gn(r, num_probes, probes_per_pass, params, key)


def gauss_newton_trace(
    predict,
    loss=None,
    params=None,
    batch=None,
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
    r = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, key = r.place(params, key)
    value, _ = _gn_trace_and_risk(r, params, key, num_probes, examples_per_chunk, method, probes_per_pass)
    return value


def gauss_newton_trace_by_layer(
    predict,
    loss=None,
    params=None,
    batch=None,
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
    r = _check_model(predict, loss, params, batch, microbatch_size, devices)
    (params,) = r.place(params)
    if examples_per_chunk is not None:
        check_positive_int(examples_per_chunk, "examples_per_chunk")
    per_group, _ = gauss_newton_exact.exact_trace_by_group(r, params, groups=groups, method=method,
                                                           examples_per_chunk=examples_per_chunk)
    return per_group


def effective_risk(
    predict,
    loss=None,
    params=None,
    batch=None,
    sigma=None,
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
    r = _check_model(predict, loss, params, batch, microbatch_size, devices)
    params, key = r.place(params, key)
    trace, value = _gn_trace_and_risk(r, params, key, num_probes, examples_per_chunk, method, probes_per_pass)
    return value + 0.5 * jnp.square(sigma) * trace


def gauss_newton_diagonal(
    predict,
    loss=None,
    params=None,
    batch=None,
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
    r = _check_model(predict, loss, params, batch, microbatch_size, devices)
    (params,) = r.place(params)
    if examples_per_chunk is not None:
        check_positive_int(examples_per_chunk, "examples_per_chunk")
    return gauss_newton_exact.exact_diagonal(r, params, examples_per_chunk=examples_per_chunk)
