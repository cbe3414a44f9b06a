"""Hessian- and Gauss-Newton-vector products of an objective on a batch or, by microbatches, a data set.

``hvp`` / ``gnvp`` act on pytrees; ``hessian_operator`` / ``gauss_newton_operator`` are the same
products as matrix-free operators on flat vectors ``[m]`` (``jax.flatten_util.ravel_pytree`` order),
the form every iterative method of ``lsgeo.curvature`` (and ``lanczos``) consumes.

With ``microbatch_size`` each product is a ``lax.scan`` over the microbatches of per-microbatch
products, weighted by their share of the examples (``lsgeo.microbatch``): the exact data-set product in
the memory of one microbatch, sharded over the devices when there are several. The products are
recomputed for every vector (forward-over-reverse, ``jax.jvp`` of ``jax.grad``): nothing of the batch is
kept between two products, and a loop of products (Lanczos, Hutchinson) compiles one product body.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lsgeo import microbatch, validation

PyTree = Any
Objective = Callable[[PyTree, Any], jax.Array]
MatVec = Callable[[jax.Array], jax.Array]

__all__ = ["hvp", "gnvp", "hessian_operator", "gauss_newton_operator"]


def check_objective(f, params, name: str = "f") -> None:
    """``f`` callable (TypeError naming it) and ``params`` floating point (ValueError)."""
    validation.check_callable(f, name)
    validation.check_float_params(params)


def flat_spec(params) -> tuple[int, Any, Any, Callable]:
    """``(m, param_dtype, work_dtype, unravel)``: the flat size, the dtype of ``ravel_pytree(params)``,
    the dtype the iterative methods work in (at least float32, so that bfloat16/float16 parameters get
    float32 reductions and eigensolvers) and a ``unravel`` that casts back to the parameters' dtype."""
    flat, unravel = ravel_pytree(params)
    work = jnp.promote_types(flat.dtype, jnp.float32)

    def unravel_cast(u):
        return unravel(u.astype(flat.dtype))

    return flat.shape[0], flat.dtype, work, unravel_cast


def check_scalar(value, name: str, what: str) -> None:
    """Trace-time check that ``value`` (an objective or a loss) is a scalar."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must return a scalar ({what}), got shape {jnp.shape(value)}")


def _hvp_tree(f, params, batch, v):
    grad = jax.grad(lambda p: _scalar_objective(f, p, batch))
    return jax.jvp(grad, (params,), (v,))[1]


def _scalar_objective(f, params, batch):
    value = f(params, batch)
    check_scalar(value, "f", "the mean of the objective over the batch")
    return value


def _gnvp_tree(predict, loss, params, batch, v):
    x, y = batch
    outputs, jvp_fn = jax.linearize(lambda p: predict(p, x), params)
    check_scalar(jax.eval_shape(loss, outputs, y), "loss", "the mean over examples")
    hjv = jax.jvp(jax.grad(lambda o: loss(o, y)), (outputs,), (jvp_fn(v),))[1]
    (gv,) = jax.linear_transpose(jvp_fn, params)(hjv)
    return gv


def hvp(
    f: Objective,
    params: PyTree,
    batch,
    v: PyTree,
    *,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> PyTree:
    """Hessian-vector product ``H v = D^2_w f(w, batch) v`` by forward-over-reverse.

    Computes ``jax.jvp(grad f, (w,), (v,))`` (Pearlmutter 1994): exact to rounding, no Hessian formed.

    Args:
      f: objective ``f(params, batch) -> scalar``, a mean over the examples of ``batch``.
      params: parameter pytree ``w``.
      batch: data passed to ``f``.
      v: tangent pytree with the structure and leaf shapes of ``params``.
      microbatch_size: ``None`` (the batch at once) or the examples per microbatch: the exact product
        over the whole batch as the example-weighted mean of per-microbatch products (``lsgeo.microbatch``).
      devices: devices the microbatches are sharded over (default: ``jax.devices()``).

    Returns:
      ``H v`` as a pytree shaped like ``params``.

    Cost: about 2-3 gradient evaluations (one forward-mode pass through the backward pass).
    Memory: that of one gradient evaluation on one microbatch plus one tangent per activation.

    Raises:
      ValueError: ``v`` does not match ``params``, integer ``params``, an empty batch, a bad
        ``microbatch_size``; TypeError: ``f`` not callable.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: jnp.mean(jnp.sum(b * w**2, axis=-1))
      >>> curvature.hvp(f, jnp.ones(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([1.0, 0.0])).tolist()
      [4.0, 0.0]
    """
    check_objective(f, params)
    validation.check_same_structure(params, v, "v")
    plan = microbatch.make_plan(batch, microbatch_size, devices=devices)
    params, batch, v = microbatch.place(plan, params, batch, v)
    return _hvp(f, plan, params, batch, v)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _hvp(f, plan, params, batch, v):
    return microbatch.reduce(lambda ops, mb: _hvp_tree(f, ops[0], mb, ops[1]), (params, v), batch, plan)


def gnvp(
    predict,
    loss,
    params: PyTree,
    batch,
    v: PyTree,
    *,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> PyTree:
    """Gauss-Newton-vector product ``G v = J^T D2L(Phi) J v`` for R(w) = L(Phi(w)).

    ``J v`` is a forward-mode product through ``predict``; ``D2L`` is applied in output space as a
    Hessian-vector product of ``loss`` at the predictions (for a mean loss this is
    ``blockdiag(H_i) / n``, see ``lsgeo.losses.output_hessians``); ``J^T`` is the transpose of the
    linearised ``predict`` (a vector-Jacobian product). Schraudolph (2002).

    Args:
      predict: ``predict(params, x) -> [n, k]`` (or ``[n]``).
      loss: ``loss(outputs, y) -> scalar``, a mean over examples.
      params: parameter pytree.
      batch: ``(x, y)``.
      v: tangent pytree with the structure and leaf shapes of ``params``.
      microbatch_size, devices: as in ``hvp`` (the exact data-set product by microbatches).

    Returns:
      ``G v`` as a pytree shaped like ``params``. G is PSD when ``loss`` is convex in the outputs.

    Cost: one forward pass, one JVP and one VJP through ``predict`` (about one gradient evaluation
    more than a forward pass) plus an HVP of ``loss`` in output space (O(n k) for the losses of
    ``lsgeo.losses``). Memory: one linearisation of ``predict`` on one microbatch.

    Raises:
      ValueError: ``v`` does not match ``params``, a loss that is not scalar, integer ``params``, an
        empty batch; TypeError: ``predict`` or ``loss`` not callable.
    """
    check_objective(predict, params, "predict")
    validation.check_callable(loss, "loss")
    validation.check_same_structure(params, v, "v")
    plan = microbatch.make_plan(batch, microbatch_size, devices=devices)
    params, batch, v = microbatch.place(plan, params, batch, v)
    return _gnvp(predict, loss, plan, params, batch, v)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _gnvp(predict, loss, plan, params, batch, v):
    return microbatch.reduce(lambda ops, mb: _gnvp_tree(predict, loss, ops[0], mb, ops[1]), (params, v), batch, plan)


def hessian_matvec(f: Objective, params: PyTree, batch, plan) -> MatVec:
    """The data-set Hessian as an operator on flat vectors in the work dtype (see ``flat_spec``); the
    traceable core of ``hessian_operator``, called inside the jitted estimators."""
    _, _, _, unravel = flat_spec(params)

    def one(ops, mb):
        p, u = ops
        return ravel_pytree(_hvp_tree(f, p, mb, unravel(u)))[0].astype(u.dtype)

    def matvec(u):
        return microbatch.reduce(one, (params, u), batch, plan)

    return matvec


def hessian_operator(
    f: Objective, params: PyTree, batch, *, microbatch_size: int | None = None, devices: Sequence | None = None
) -> MatVec:
    """The Hessian of ``f`` at ``params`` as a matrix-free operator on flat vectors ``[m]``.

    Returns ``matvec(u) = ravel(H unravel(u))``, each call one forward-over-reverse product (about 2-3
    gradient evaluations; with ``microbatch_size``, a scan of per-microbatch products). Nothing is kept
    between calls, so memory is that of one product. ``matvec`` may be ``vmap``-ed over a batch of
    vectors (the primal pass is then shared and the tangents batched) and used inside ``jit``.
    """
    check_objective(f, params)
    plan = microbatch.make_plan(batch, microbatch_size, devices=devices)
    params, batch = microbatch.place(plan, params, batch)
    return hessian_matvec(f, params, batch, plan)


def gauss_newton_operator(
    predict, loss, params: PyTree, batch, *, microbatch_size: int | None = None, devices: Sequence | None = None
) -> MatVec:
    """The Gauss-Newton matrix ``G = J^T D2L J`` as a matrix-free operator on flat vectors ``[m]``.

    Each call is one ``gnvp`` (one JVP and one VJP through ``predict`` per microbatch). Use it with
    ``lanczos`` for Gauss-Newton spectra. Memory: one linearisation of ``predict`` on one microbatch.
    """
    check_objective(predict, params, "predict")
    validation.check_callable(loss, "loss")
    plan = microbatch.make_plan(batch, microbatch_size, devices=devices)
    params, batch = microbatch.place(plan, params, batch)
    _, _, _, unravel = flat_spec(params)

    def one(ops, mb):
        p, u = ops
        return ravel_pytree(_gnvp_tree(predict, loss, p, mb, unravel(u)))[0].astype(u.dtype)

    def matvec(u):
        return microbatch.reduce(one, (params, u), batch, plan)

    return matvec
