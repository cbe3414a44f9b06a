"""Fisher operators: the empirical Fisher and the Monte Carlo Fisher (sampled labels).

References: J. Martens, New insights and perspectives on the natural gradient method, JMLR 2020
(Fisher = Gauss-Newton for exponential-family losses); F. Kunstner, L. Balles, P. Hennig, Limitations of
the empirical Fisher approximation for natural gradient descent, NeurIPS 2019; F. Dangel et al.,
curvlinops (the conventions compared below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import validation
from lsgeo import losses as losses_lib
from lsgeo.curvature.operators.base import operator_dataclass
from lsgeo.curvature.operators.gauss_newton import PredictorOperator, rowwise_dot
from lsgeo.objective import Risk

__all__ = ["EmpiricalFisher", "MonteCarloFisher", "register_label_sampler", "label_sampler"]


@operator_dataclass
class EmpiricalFisher(PredictorOperator):
    """The empirical Fisher (uncentred gradient covariance) ``E = 1/n sum_i g_i g_i^T``.

    ``g_i = grad_w l(phi_i(w), y_i)`` is the gradient of example i's loss, where the loss is the mean
    ``L = 1/n sum_i l(phi_i, y_i)`` (the contract of ``lsgeo.losses``). Products need no per-example
    gradient: ``E v = J^T c / n`` with ``c_i = r_i <r_i, J_i v>`` and ``r_i = d l / d phi_i``, one JVP
    and one VJP through ``predict``. Normalisation against curvlinops' ``EFLinearOperator``
    (``c sum_n grad l_n grad l_n^T``, ``c = 1/N`` for ``reduction="mean"``): equal for cross-entropy
    (``CrossEntropyLoss``) and the logistic loss (``BCEWithLogitsLoss`` with labels (y + 1) / 2); for the
    squared loss lsgeo's ``l_i = ||phi_i - y_i||^2 / 2`` gives ``E``, where curvlinops' ``MSELoss`` (mean over
    the N C entries, no 1/2) gives ``4 E / C``. Not a curvature of the loss in general (Kunstner et al.
    2019): it equals the Fisher only at a perfect fit of the labels' distribution.

    Args and cost as ``GaussNewton``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature, losses
      >>> x, y = jnp.array([[1.0], [2.0]]), jnp.array([[1.0], [0.0]])
      >>> op = curvature.EmpiricalFisher(lambda w, x: x @ w, losses.squared_loss, jnp.ones((1, 1)), (x, y))
      >>> op.to_dense().tolist()  # residuals (0, 2): g = (0, 4), mean of g^2 = 8
      [[8.0]]
    """

    def _linear_map(self, params, mb):
        x, y = mb
        outputs, jvp, vjp = self._linearize(params, x)
        r = self._output_gradients(outputs, y)
        n = outputs.shape[0]

        def apply(v):
            s = rowwise_dot(r, jvp(v))
            return vjp(r * (s / n).reshape((n,) + (1,) * (r.ndim - 1)))

        return apply


# -- label samplers: draw y ~ p(y | phi) for the losses of lsgeo.losses -------------------------------

LabelSampler = Callable[[jax.Array, jax.Array], jax.Array]
_SAMPLERS: dict[Callable, LabelSampler] = {}


def register_label_sampler(loss, sampler: LabelSampler):
    """Registers ``sampler(key, phi_i) -> y_i``, a draw of one example's label from the predictive
    distribution of ``loss`` (the exponential family whose negative log-likelihood ``loss`` is), so that
    ``MonteCarloFisher`` accepts ``loss``. Returns ``loss``."""
    _SAMPLERS[loss] = sampler
    return loss


def label_sampler(loss) -> LabelSampler:
    """The registered sampler of ``loss`` (looking through ``functools.wraps`` wrappers); ValueError if none."""
    seen, fn = set(), loss
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        try:
            if fn in _SAMPLERS:
                return _SAMPLERS[fn]
        except TypeError:
            break
        fn = getattr(fn, "__wrapped__", None)
    raise ValueError(
        f"loss {getattr(loss, '__name__', loss)!r} has no label sampler: MonteCarloFisher draws labels from the "
        f"model's predictive distribution, known for squared_loss, logistic_loss and softmax_cross_entropy; "
        f"register one with lsgeo.curvature.register_label_sampler(loss, sampler)"
    )


register_label_sampler(losses_lib.squared_loss, lambda key, phi: phi + jax.random.normal(key, phi.shape, phi.dtype))
register_label_sampler(
    losses_lib.logistic_loss,
    lambda key, phi: jnp.where(jax.random.bernoulli(key, jax.nn.sigmoid(phi)), 1.0, -1.0).astype(phi.dtype),
)
register_label_sampler(losses_lib.softmax_cross_entropy, lambda key, phi: jax.random.categorical(key, phi))


@operator_dataclass
class MonteCarloFisher(PredictorOperator):
    """The Monte Carlo Fisher ``F = 1/n sum_i 1/S sum_s g~_is g~_is^T`` with sampled labels.

    ``g~_is = grad_w l(phi_i(w), y~_is)`` with ``y~_is ~ p(y | phi_i)`` drawn from the model's predictive
    distribution (categorical for cross-entropy, N(phi, I) for the squared loss, Bernoulli for the
    logistic loss; ``register_label_sampler`` for others), ``S = num_samples``. Since
    ``E_y[r r^T] = H_i`` for these losses, ``E[F] = G``, the Gauss-Newton matrix (the Fisher of the
    model's likelihood, Martens 2020), with a Monte Carlo error that falls like ``1/sqrt(n S)``. The
    draws are fixed by ``key`` and the example's index in the batch (``fold_in(fold_in(key, i), s)``), so
    the operator is one fixed PSD matrix, whatever the microbatch cut. Matches curvlinops'
    ``FisherMCLinearOperator`` for cross-entropy (with other random draws).

    Args:
      predict, loss, params, batch: as ``GaussNewton`` (``y`` of the batch is not used).
      key: PRNG key of the label draws.
      num_samples: labels drawn per example, ``S >= 1``.
      microbatch_size, devices: the data plan.

    Cost: as ``GaussNewton`` plus ``S`` output-space gradients per example.

    Raises:
      ValueError: a loss without a label sampler, a bad ``key`` or ``num_samples``.
    """

    key: jax.Array = None
    num_samples: int = dataclasses.field(default=1, metadata={"static": True}, kw_only=True)

    @classmethod
    def _from_functions(cls, predict, loss, params, batch, key, *, num_samples: int = 1,
                        microbatch_size: int | None = None, devices: Sequence | None = None):
        return cls(Risk(predict, loss, batch, microbatch_size=microbatch_size, devices=devices, data_name="batch"), params, key,
                   num_samples=num_samples)

    @classmethod
    def _from_objective(cls, risk, params, key, *, num_samples: int = 1):
        validation.check_key(key, "key")
        validation.check_positive_int(num_samples, "num_samples")
        if not isinstance(risk, Risk):
            raise ValueError(f"MonteCarloFisher is built from a Risk, got {type(risk).__name__}")
        if not risk.holds_batch:
            raise ValueError("MonteCarloFisher takes an in-memory batch (its draws are keyed by the example's index), "
                             "not a data source")
        label_sampler(risk.loss)
        risk.check(params)
        x, _ = risk.data
        n = validation.check_batch(x, "batch x", common_axis=True)
        indexed = risk.replace(data=(x, jnp.arange(n, dtype=np.int32)))  # the labels are drawn, not read
        (params,) = indexed.place(params)
        key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
        return cls._make(objective=indexed, params=params, key=key, num_samples=int(num_samples))

    def replace(self, **changes):
        """As ``CurvatureOperator.replace``; new ``data=(x, y)`` is indexed again (the labels are drawn)."""
        if "data" not in changes:
            return super().replace(**changes)
        risk = self.objective
        new = Risk(risk.predict, risk.loss, changes.pop("data"), microbatch_size=risk.microbatch_size,
                   devices=risk.devices)
        params = changes.pop("params", self.params)
        op = type(self)._from_objective(new, params, changes.pop("key", self.key),
                                        num_samples=changes.pop("num_samples", self.num_samples))
        return super(MonteCarloFisher, op).replace(**changes) if changes else op

    def _linear_map(self, params, mb):
        x, index = mb
        outputs, jvp, vjp = self._linearize(params, x)
        n, draw = outputs.shape[0], label_sampler(self.loss)

        def labels(s):
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(self.key, i), s))(index)
            return jax.vmap(draw)(keys, outputs)

        r = jax.vmap(lambda s: self._output_gradients(outputs, labels(s)))(jnp.arange(self.num_samples))

        def apply(v):
            jv = jvp(v)
            s = jax.vmap(lambda rs: rowwise_dot(rs, jv))(r)  # [S, n]
            c = jnp.sum(r * (s / (n * self.num_samples)).reshape(s.shape + (1,) * (r.ndim - 2)), axis=0)
            return vjp(c)

        return apply
