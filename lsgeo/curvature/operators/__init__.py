"""Curvature operators: a curvature matrix of a model on a data set, built once from an objective.

  base          ``CurvatureOperator`` (products, flat forms, ``to_dense``, ``replace``), ``blocks``
  hessian       ``Hessian(objective, params)`` / ``Hessian(f, params, batch, ...)``
  gauss_newton  ``GaussNewton(risk, params)`` / ``GaussNewton(predict, loss, params, batch, ...)``
  fisher        ``EmpiricalFisher``, ``MonteCarloFisher``, ``register_label_sampler``

Operators import the objective and the data plan, never an estimator.
"""

from lsgeo.curvature.operators.base import (
    DEFAULT_VECTORS_PER_PASS,
    CurvatureOperator,
    OperatorType,
    blocks,
    operator_dataclass,
)
from lsgeo.curvature.operators.fisher import EmpiricalFisher, MonteCarloFisher, label_sampler, register_label_sampler
from lsgeo.curvature.operators.gauss_newton import GaussNewton, PredictorOperator
from lsgeo.curvature.operators.hessian import Hessian

__all__ = [
    "CurvatureOperator",
    "OperatorType",
    "operator_dataclass",
    "PredictorOperator",
    "Hessian",
    "GaussNewton",
    "EmpiricalFisher",
    "MonteCarloFisher",
    "register_label_sampler",
    "label_sampler",
    "blocks",
    "DEFAULT_VECTORS_PER_PASS",
]
