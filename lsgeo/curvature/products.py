"""Hessian- and Gauss-Newton-vector products in one call: the function forms of the ``Hessian`` and
``GaussNewton`` operators.

``hvp(f, params, batch, v)`` is ``Hessian(f, params, batch) @ v``; ``hessian_operator`` /
``gauss_newton_operator`` return the operators' flat products ``u [m] -> [m]`` for code written against
plain matvecs (``lanczos``). To apply the same curvature to many vectors, build the operator once:
the data plan is then validated, cut and placed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lsgeo import validation
from lsgeo.curvature.operators import GaussNewton
from lsgeo.curvature.operators import Hessian
from lsgeo.objective import as_objective

PyTree = Any
MatVec = Callable

__all__ = ["hvp", "gnvp", "hessian_operator", "gauss_newton_operator"]


def hvp(f, params: PyTree, batch, v: PyTree, *, microbatch_size: int | None = None,
        devices: Sequence | None = None) -> PyTree:
    """Hessian-vector product ``H v = D^2_w f(w, batch) v`` by forward-over-reverse (Pearlmutter 1994).

    ``Hessian(f, params, batch, microbatch_size=..., devices=...) @ v``: exact to rounding, no Hessian formed.

    Args:
      f: objective ``f(params, batch) -> scalar``, a mean over the examples of ``batch``.
      params: parameter pytree ``w``.
      batch: data passed to ``f``.
      v: tangent pytree with the structure and leaf shapes of ``params`` (any floating dtype: it is cast
        to the parameters' dtypes).
      microbatch_size: ``None`` (the batch at once) or the examples per microbatch: the exact product
        over the whole batch as the example-weighted mean of per-microbatch products (``lsgeo.dataplan``).
      devices: devices the microbatches are sharded over (default: ``jax.devices()``).

    Returns:
      ``H v`` as a pytree shaped like ``params`` (the parameters' dtypes).

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
    validation.check_same_structure(params, v, "v")
    return Hessian(f, params, batch, microbatch_size=microbatch_size, devices=devices) @ v


def gnvp(predict, loss, params: PyTree, batch, v: PyTree, *, microbatch_size: int | None = None,
         devices: Sequence | None = None) -> PyTree:
    """Gauss-Newton-vector product ``G v = J^T D2L(Phi) J v`` for R(w) = L(Phi(w)) (Schraudolph 2002).

    ``GaussNewton(predict, loss, params, batch, microbatch_size=..., devices=...) @ v``.

    Args:
      predict: ``predict(params, x) -> [n, k]`` (or ``[n]``).
      loss: ``loss(outputs, y) -> scalar``, a mean over examples.
      params: parameter pytree.
      batch: ``(x, y)``.
      v: tangent pytree with the structure and leaf shapes of ``params``.
      microbatch_size, devices: as in ``hvp`` (the exact data-set product by microbatches).

    Returns:
      ``G v`` as a pytree shaped like ``params``. G is PSD when ``loss`` is convex in the outputs.

    Cost: one forward pass, one JVP and one VJP through ``predict`` plus an O(n k) output-space product.

    Raises:
      ValueError: ``v`` does not match ``params``, a loss that is not scalar, integer ``params``, an
        empty batch; TypeError: ``predict`` or ``loss`` not callable.
    """
    validation.check_same_structure(params, v, "v")
    return GaussNewton(predict, loss, params, batch, microbatch_size=microbatch_size, devices=devices) @ v


def hessian_operator(f, params: PyTree, batch=None) -> MatVec:
    """The Hessian of ``f`` at ``params`` as a flat matvec ``u [m] -> [m]`` (``Hessian(...).matvec``;
    traceable, so it may be ``vmap``-ed and used inside ``jit``). ``f`` may be an ``lsgeo.Objective`` (then
    ``batch=None``; microbatches and devices are its own)."""
    return Hessian(as_objective(f, batch), params).matvec


def gauss_newton_operator(predict, loss, params: PyTree, batch, *, microbatch_size: int | None = None,
                          devices: Sequence | None = None) -> MatVec:
    """The Gauss-Newton matrix ``G = J^T D2L J`` as a flat matvec ``u [m] -> [m]`` (``GaussNewton(...).matvec``)."""
    return GaussNewton(predict, loss, params, batch, microbatch_size=microbatch_size, devices=devices).matvec
