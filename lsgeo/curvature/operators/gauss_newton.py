"""The Gauss-Newton matrix ``G = J^T D2L J`` of R(w) = L(Phi(w)), as a curvature operator.

``PredictorOperator`` is the shared part of the operators built from a predictor and a loss (this one and
the Fisher operators of ``lsgeo.curvature.operators.fisher``): the argument checks, the data plan and the
linearisation of ``predict`` on a microbatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lsgeo import per_example
from lsgeo.curvature.operators import gauss_newton_exact
from lsgeo.curvature.operators.base import CurvatureOperator, operator_dataclass
from lsgeo.validation import check_choice, check_positive_int
from lsgeo.objective import Risk, check_scalar, mean_risk

__all__ = ["GaussNewton", "PredictorOperator", "rowwise_dot"]


@operator_dataclass
class PredictorOperator(CurvatureOperator):
    """Base of the operators built from a ``Risk`` (``predict(params, x) -> [n, k]`` and a mean loss):
    ``Op(risk, params)`` or ``Op(predict, loss, params, batch, *, microbatch_size=None, devices=None)``."""

    _objective_type = Risk

    @classmethod
    def _from_functions(cls, predict, loss, params, batch, *, microbatch_size: int | None = None,
                        devices: Sequence | None = None):
        return cls(Risk(predict, loss, batch, microbatch_size=microbatch_size, devices=devices, data_name="batch"), params)

    @property
    def predict(self):
        return self.objective.predict

    @property
    def loss(self):
        return self.objective.loss

    def _value_fn(self):
        return mean_risk(self.predict, self.loss)

    def _linearize(self, params, x):
        """``(outputs, jvp, vjp)``: the predictions on ``x`` and the linearised predictor (J v) and its
        transpose (J^T c), with respect to the variable parameters."""
        pv, merge = self._variable(params)
        outputs, jvp = jax.linearize(lambda p: self.predict(merge(p), x), pv)
        transpose = jax.linear_transpose(jvp, pv)
        return outputs, jvp, lambda c: transpose(c)[0]

    def _output_gradients(self, outputs, y):
        """``r_i = d l(phi_i, y_i) / d phi_i``, the per-example output gradients (``n`` times the gradient
        of the mean loss), shaped like ``outputs``."""
        value, grad = jax.value_and_grad(self.loss)(outputs, y)
        check_scalar(value, "loss", "the mean over examples")
        return grad * outputs.shape[0]


def rowwise_dot(a, b):
    """``<a_i, b_i>`` for every example ``i`` (the leading axis)."""
    return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


@operator_dataclass
class GaussNewton(PredictorOperator):
    """The Gauss-Newton matrix ``G = J^T D2L(Phi) J`` for R(w) = L(Phi(w)) (the generalised Gauss-Newton
    of Schraudolph 2002; the paper's tr(D2L DPhi DPhi^T) is its trace).

    ``J v`` is a forward-mode product through ``predict``, ``D2L`` is applied in output space (for a mean
    loss ``blockdiag(H_i) / n``, ``lsgeo.losses.output_hessians``) and ``J^T`` is the transposed
    linearisation. ``G = 1/n sum_i J_i^T H_i J_i`` is PSD when the loss is convex in the outputs, equals
    the Hessian's first term ``H = G + sum_i dL/dphi_i D^2 phi_i``, and is the expectation of
    ``MonteCarloFisher`` for the losses of ``lsgeo.losses``.

    Built as ``GaussNewton(risk, params)`` from an ``lsgeo.Risk``, or positionally as
    ``GaussNewton(predict, loss, params, batch, *, microbatch_size=None, devices=None)``:

    Args:
      predict: ``predict(params, x) -> [n, k]`` (or ``[n]``).
      loss: ``loss(outputs, y) -> scalar``, a mean over examples.
      params: parameter pytree.
      batch: ``(x, y)``.
      microbatch_size, devices: the data plan, as in ``Hessian``.

    Cost: one product is a JVP and a VJP through ``predict`` per microbatch (about two gradients) plus an
    O(n k) product in output space. Memory: one linearisation of ``predict`` on one microbatch.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature, losses
      >>> predict = lambda w, x: x @ w  # linear model: G = X^T X / n for the squared loss
      >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> op = curvature.GaussNewton(predict, losses.squared_loss, jnp.zeros(2), (x, jnp.zeros(2)))
      >>> op.to_dense().tolist()
      [[1.0, 1.0], [1.0, 2.0]]
    """

    def _linear_map(self, params, mb):
        x, y = mb
        outputs, jvp, vjp = self._linearize(params, x)

        def mean_loss(o):
            value = self.loss(o, y)
            check_scalar(value, "loss", "the mean over examples")
            return value

        output_hessian = jax.linearize(jax.grad(mean_loss), outputs)[1]
        return lambda v: vjp(output_hessian(jvp(v)))

    def exact_trace(self, *, groups=None, by_group: bool = False, method: str = "fast",
                    examples_per_chunk: int | None = None):
        """``tr G = 1/n sum_i tr(H_i J_i J_i^T)``, exactly, from per-example Jacobian Grams (no products, no probes;
        ``lsgeo.curvature.operators.gauss_newton_exact``, the implementation ``lsgeo.risk.gauss_newton_trace``
        uses too). ``by_group=True``: ``{group: trace of its diagonal block}`` (``groups`` as in ``blocks``).
        Cost: about k one-example backward passes per example."""
        self._check_exact(method, examples_per_chunk)
        per_group, _ = gauss_newton_exact.exact_trace_by_group(self.objective, self.params, groups=groups,
                                                               method=method, examples_per_chunk=examples_per_chunk)
        return per_group if by_group else sum(per_group.values())

    def exact_diagonal(self, *, examples_per_chunk: int | None = None):
        """``diag G = 1/n sum_i diag(J_i^T H_i J_i)``, exactly, a pytree shaped like the parameters (BackPACK's
        ``DiagGGNExact``; the implementation ``lsgeo.risk.gauss_newton_diagonal`` uses too)."""
        self._check_exact("fast", examples_per_chunk)
        return gauss_newton_exact.exact_diagonal(self.objective, self.params, examples_per_chunk=examples_per_chunk)

    def _check_exact(self, method, examples_per_chunk):
        check_choice(method, "method", per_example.METHODS)
        if examples_per_chunk is not None:
            check_positive_int(examples_per_chunk, "examples_per_chunk")
        if self.block is not None:
            raise ValueError("the exact trace/diagonal are computed on the full operator; for a block use "
                             "op.exact_trace(groups=..., by_group=True) on the operator it was taken from")
