"""The Gauss-Newton matrix ``G = J^T D2L J`` of R(w) = L(Phi(w)), as a curvature operator.

``PredictorOperator`` is the shared part of the operators built from a predictor and a loss (this one and
the Fisher operators of ``lsgeo.curvature.fisher``): the argument checks, the data plan and the
linearisation of ``predict`` on a microbatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lsgeo import microbatch, validation
from lsgeo.curvature.hessian_operator import check_objective, check_scalar
from lsgeo.curvature.operator import CurvatureOperator

__all__ = ["GaussNewton", "PredictorOperator", "mean_risk"]


def mean_risk(predict, loss):
    """``R(params, (x, y)) = loss(predict(params, x), y)`` as a function of the operator's own arguments."""
    return _mean_risk(predict, loss)


class _mean_risk:  # noqa: N801 (a hashable function object: equal for equal (predict, loss), so caches hit)
    def __init__(self, predict, loss):
        self.predict, self.loss = predict, loss

    def __call__(self, params, batch):
        x, y = batch
        return self.loss(self.predict(params, x), y)

    def __eq__(self, other):
        return isinstance(other, _mean_risk) and (self.predict, self.loss) == (other.predict, other.loss)

    def __hash__(self):
        return hash((self.predict, self.loss))


def check_pair(batch, name: str = "batch") -> None:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"{name} must be a pair (x, y) for an operator built from predict and loss, got {type(batch).__name__}")


class PredictorOperator(CurvatureOperator):
    """Base of the operators built from ``predict(params, x) -> [n, k]`` and a mean loss ``loss(outputs, y)``."""

    _meta_fields = ("predict", "loss", "plan", "block")

    def __init__(self, predict, loss, params, batch, *, microbatch_size: int | None = None,
                 devices: Sequence | None = None):
        self._build(predict, loss, params, batch, batch if microbatch.is_source(batch) else tuple(batch),
                    microbatch_size, devices)

    def _build(self, predict, loss, params, batch, data, microbatch_size, devices, **extra):
        check_objective(predict, params, "predict")
        validation.check_callable(loss, "loss")
        if not microbatch.is_source(batch):
            check_pair(batch)
        plan = microbatch.data_plan(batch, microbatch_size, devices=devices)
        if plan is None or isinstance(plan, microbatch.MicrobatchPlan):  # in memory, on this process
            validation.check_loss_targets(predict, loss, params, batch)
            microbatch.check_mean_over_examples(mean_risk(predict, loss), params, batch, plan,
                                                name="loss(predict(...))")
        (params,) = microbatch.place(plan, params)
        self._set(predict=predict, loss=loss, params=params, data=microbatch.layout(plan, data), plan=plan,
                  block=None, **extra)

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


@jax.tree_util.register_pytree_node_class
class GaussNewton(PredictorOperator):
    """The Gauss-Newton matrix ``G = J^T D2L(Phi) J`` for R(w) = L(Phi(w)) (the generalised Gauss-Newton
    of Schraudolph 2002; the paper's tr(D2L DPhi DPhi^T) is its trace).

    ``J v`` is a forward-mode product through ``predict``, ``D2L`` is applied in output space (for a mean
    loss ``blockdiag(H_i) / n``, ``lsgeo.losses.output_hessians``) and ``J^T`` is the transposed
    linearisation. ``G = 1/n sum_i J_i^T H_i J_i`` is PSD when the loss is convex in the outputs, equals
    the Hessian's first term ``H = G + sum_i dL/dphi_i D^2 phi_i``, and is the expectation of
    ``MonteCarloFisher`` for the losses of ``lsgeo.losses``.

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
