"""Convolutions in XLA:CPU's canonical layout, so that they stay fast inside loop bodies.

XLA:CPU runs a convolution through its fast (Eigen, multithreaded) kernel only when its dimension
numbers are canonical: input ``[N, spatial..., C]``, kernel ``[spatial..., I, O]``, output
``[N, spatial..., C]``. Its ``ConvCanonicalization`` pass transposes other convolutions into that
form, but it visits only the entry computation, so a non-canonical convolution inside a ``while``/``scan``
body falls back to a naive loop nest. Reverse-mode autodiff produces exactly such convolutions (the
kernel gradient contracts over the batch: dimension numbers ``f01b_i01o->01bf``), so the gradient or
Hessian-vector product of a conv net inside the microbatch scan or a Lanczos loop ran 10-45x slower on
CPU than outside a loop (measured: a ResNet-18 gradient over two microbatches of 512 images in a scan,
250 s against 2 x 2.7 s).

``canonicalize_convolutions(fn)`` traces ``fn`` to a jaxpr (``jax.make_jaxpr``) and re-evaluates it with
every non-canonical ``conv_general_dilated`` replaced by transpose -> canonical convolution -> transpose
(the same rewrite as XLA's pass, done before lowering, so it applies in loop bodies too). Equations are
otherwise evaluated unchanged, in segments (``jax.extend.core.jaxpr_as_fun``), and calls (``jit``) are
entered only when they contain a convolution. The values are identical up to rounding; on other
backends (GPUs, TPUs lay out convolutions themselves) ``fn`` is returned unchanged.

JAX surface used, nothing from ``jax._src``: ``jax.make_jaxpr``, ``jax.lax.conv_general_dilated_p``,
``jax.lax.ConvDimensionNumbers`` and that of :mod:`lsgeo.jaxpr_interpreter` (the segment evaluator shared
with the per-example tracer); with any of it missing, ``fn`` is returned unchanged.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lsgeo.cpu_convolutions import canonicalize_convolutions
  >>> conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NCH", "OIH", "NCH"))
  >>> x, w = jnp.ones((2, 3, 5)), jnp.ones((4, 3, 3))
  >>> bool(jnp.allclose(canonicalize_convolutions(conv, "cpu")(x, w), conv(x, w)))
  True
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from lsgeo import jaxpr_interpreter as interp

__all__ = ["canonicalize_convolutions"]

_CONV = getattr(jax.lax, "conv_general_dilated_p", None)
_DIMS = getattr(jax.lax, "ConvDimensionNumbers", None)
_AVAILABLE = None not in (_CONV, _DIMS) and interp.missing_surface() is None


def _canonical(dims, ndim) -> bool:
    k = ndim - 2
    lhs, rhs, out = dims
    spatial = tuple(range(1, k + 1))
    return (tuple(lhs) == (0, k + 1, *spatial) and tuple(out) == (0, k + 1, *spatial)
            and tuple(rhs) == (k + 1, k, *range(k)))


def _canonical_conv(lhs, rhs, params):
    """``conv_general_dilated`` with canonical dimension numbers between two transposes."""
    dims = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = (tuple(s) for s in dims)
    k = lhs.ndim - 2
    lhs_t = jax.lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # [N, spatial..., C]
    rhs_t = jax.lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # [spatial..., I, O]
    spatial = tuple(range(1, k + 1))
    canonical = _DIMS((0, k + 1, *spatial), (k + 1, k, *range(k)), (0, k + 1, *spatial))
    (out,) = [_CONV.bind(lhs_t, rhs_t, **{**params, "dimension_numbers": canonical})]
    # canonical output axes: batch 0, spatial i at 1 + i, feature k + 1; put each where out_spec wants it
    source = [0] * (k + 2)
    source[out_spec[0]] = 0
    source[out_spec[1]] = k + 1
    for i in range(k):
        source[out_spec[2 + i]] = 1 + i
    return jax.lax.transpose(out, tuple(source))


def _needs_rewrite(eqn) -> bool:
    if eqn.primitive is _CONV:
        return not _canonical(eqn.params["dimension_numbers"], eqn.invars[0].aval.ndim)
    body = interp.call_body(eqn)
    return body is not None and _contains_rewrite(body.jaxpr)


def _contains_rewrite(jaxpr) -> bool:
    return any(_needs_rewrite(eqn) for eqn in jaxpr.eqns)


def _evaluate(jaxpr, consts, args):
    def handle(idx, eqn, invals):
        if eqn.primitive is _CONV:
            return [_canonical_conv(*invals, eqn.params)]
        body = interp.call_body(eqn)
        return _evaluate(body.jaxpr, body.consts, invals)

    return interp.evaluate(jaxpr, consts, args, select=lambda idx, eqn: _needs_rewrite(eqn), handle=handle)


def canonicalize_convolutions(fn: Callable, platform: str | None = None) -> Callable:
    """``fn`` with its convolutions in XLA:CPU's canonical layout when ``platform`` (default: JAX's default
    backend) is ``"cpu"``; ``fn`` itself otherwise. Traceable: call the result inside ``jit``/``scan``.
    Cost: one extra trace of ``fn``; at run time, the transposes XLA's own pass would have inserted."""
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu" or not _AVAILABLE:
        return fn

    @functools.wraps(fn)
    def canonical(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree_util.tree_leaves(args)
        if _contains_rewrite(closed.jaxpr):
            outs = _evaluate(closed.jaxpr, closed.consts, leaves)
        else:
            outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *leaves)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return canonical
