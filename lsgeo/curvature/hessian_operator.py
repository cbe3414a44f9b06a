"""The Hessian of an objective on a batch or a data set, as a curvature operator."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from lsgeo import microbatch, validation
from lsgeo.curvature.operator import CurvatureOperator

__all__ = ["Hessian", "check_objective", "check_scalar"]


def check_objective(f, params, name: str = "f") -> None:
    """``f`` callable (TypeError naming it) and ``params`` floating point (ValueError)."""
    validation.check_callable(f, name)
    validation.check_float_params(params)


def check_scalar(value, name: str, what: str) -> None:
    """Trace-time check that ``value`` (an objective or a loss) is a scalar."""
    if jax.numpy.ndim(value) != 0:
        raise ValueError(f"{name} must return a scalar ({what}), got shape {jax.numpy.shape(value)}")


@jax.tree_util.register_pytree_node_class
class Hessian(CurvatureOperator):
    """``H = D^2_w f(w, B)``, the Hessian of the objective ``f`` at ``params`` on the batch ``B``.

    Products by forward-over-reverse, ``jax.linearize`` of ``jax.grad f`` (Pearlmutter 1994): exact to
    rounding, no Hessian formed. ``f`` must be a mean over the examples of ``batch``; with
    ``microbatch_size`` each product is the exact data-set product, the example-weighted mean over
    microbatches (``lsgeo.microbatch``), sharded over ``devices`` (default ``jax.devices()``), each device
    holding its share of the data. The data plan is validated, cut and placed once, here.

    Args:
      f: objective ``f(params, batch) -> scalar``.
      params: parameter pytree (floating point).
      batch: data passed to ``f`` (with ``microbatch_size``, a pytree of arrays ``[n, ...]``), or a data
        source: a zero-argument callable returning a fresh iterator of batches (a generator function, a
        numpy memmap cut into batches, a grain DataLoader), read one batch at a time on every product
        (``lsgeo.microbatch.stream_plan``: device memory one batch, host memory what the source holds).
      microbatch_size: ``None`` (the batch at once, or a source's own batches) or the examples per microbatch.
      devices: devices the microbatches are sharded over.

    Cost: one product is about 2-3 gradient evaluations per microbatch. Memory: one microbatch's
    forward-over-reverse pass (per vector of a batched product).

    Raises:
      TypeError: ``f`` not callable. ValueError: integer ``params``, an empty batch, a bad
      ``microbatch_size`` or ``devices``, an ``f`` that is not a mean over independent examples (BatchNorm
      in training mode) when microbatched.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: jnp.mean(jnp.sum(b * w**2, axis=-1))
      >>> op = curvature.Hessian(f, jnp.ones(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> (op @ jnp.array([1.0, 0.0])).tolist(), op.to_dense().tolist()
      ([4.0, 0.0], [[4.0, 0.0], [0.0, 6.0]])
    """

    _meta_fields = ("f", "plan", "block")

    def __init__(self, f, params, batch, *, microbatch_size: int | None = None, devices: Sequence | None = None):
        check_objective(f, params)
        plan = microbatch.data_plan(batch, microbatch_size, devices=devices)
        microbatch.check_mean_over_examples(f, params, batch, plan, name="f")
        (params,) = microbatch.place(plan, params)
        self._set(f=f, params=params, data=microbatch.layout(plan, batch), plan=plan, block=None)

    def _value_fn(self):
        return self.f

    def _linear_map(self, params, mb):
        pv, merge = self._variable(params)

        def value(p):
            out = self.f(merge(p), mb)
            check_scalar(out, "f", "the mean of the objective over the batch")
            return out

        return jax.linearize(jax.grad(value), pv)[1]
