"""The Hessian of an objective on a batch or a data set, as a curvature operator."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from lsgeo.curvature.operators.base import CurvatureOperator, operator_dataclass
from lsgeo.objective import Objective, check_scalar

__all__ = ["Hessian"]


@operator_dataclass
class Hessian(CurvatureOperator):
    """``H = D^2_w F(w)``, the Hessian of a data-set objective at ``params``: ``Hessian(objective, params)``,
    or ``Hessian(f, params, batch, *, microbatch_size=None, devices=None)``, which builds
    ``lsgeo.Objective(f, batch, microbatch_size=..., devices=...)`` first.

    Not to be confused with ``lsgeo.curvature.hessian(f, params, batch)``, the dense ``[m, m]`` matrix of a
    small model; ``Hessian(...).to_dense()`` gives the same matrix by products.

    Products by forward-over-reverse, ``jax.linearize`` of ``jax.grad f`` (Pearlmutter 1994): exact to
    rounding, no Hessian formed. ``f`` must be a mean over the examples of ``batch``; with
    ``microbatch_size`` each product is the exact data-set product, the example-weighted mean over
    microbatches (``lsgeo.dataplan``), sharded over ``devices`` (default ``jax.devices()``), each device
    holding its share of the data. The data plan is validated, cut and placed once, here.

    Args:
      f: objective ``f(params, batch) -> scalar``.
      params: parameter pytree (floating point).
      batch: data passed to ``f`` (with ``microbatch_size``, a pytree of arrays ``[n, ...]``), or a data
        source: a zero-argument callable returning a fresh iterator of batches (a generator function, a
        numpy memmap cut into batches, a grain DataLoader), read one batch at a time on every product
        (``lsgeo.dataplan.stream_plan``: device memory one batch, host memory what the source holds).
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

    @classmethod
    def _from_functions(cls, f, params, batch, *, microbatch_size: int | None = None,
                        devices: Sequence | None = None):
        return cls(Objective(f, batch, microbatch_size=microbatch_size, devices=devices, data_name="batch"), params)

    @property
    def f(self):
        """The objective's ``f(params, batch)``."""
        return self.objective.f

    def _linear_map(self, params, mb):
        pv, merge = self._variable(params)
        f = self.objective.f

        def value(p):
            out = f(merge(p), mb)
            check_scalar(out, "f", "the mean of the objective over the batch")
            return out

        return jax.linearize(jax.grad(value), pv)[1]
