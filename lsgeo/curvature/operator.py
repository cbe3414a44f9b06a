"""The two call forms of an estimator: ``NAME(op, key, ...)`` and ``NAME(f, params, batch, key, ...)``.

``resolve`` turns either into ``(operator, key)``; the function form builds ``Hessian(objective, params)``
with ``objective = lsgeo.Objective(f, batch, microbatch_size=..., devices=...)`` (or ``f`` itself when it is
already an ``Objective``/``Risk``). Each argument slot is read as what its name says: in the function form
``batch`` may be None (an objective that ignores its batch, a test function of the parameters).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lsgeo.curvature.operator import resolve
  >>> op, key = resolve(lambda w, b: jnp.sum(w**2), jnp.ones(2), None, jax.random.key(0), name="demo")
  >>> op.to_dense().tolist()
  [[2.0, 0.0], [0.0, 2.0]]
"""

from __future__ import annotations

from lsgeo import validation
from lsgeo.curvature.operators.base import DEFAULT_VECTORS_PER_PASS, CurvatureOperator, blocks
from lsgeo.curvature.operators.hessian import Hessian
from lsgeo.objective import as_objective

__all__ = ["resolve", "CurvatureOperator", "blocks", "DEFAULT_VECTORS_PER_PASS"]


def resolve(f, params, batch, key, *, name: str, microbatch_size=None, devices=None, key_required=True):
    """``(operator, key)`` from ``NAME(op, key, ...)`` (``key`` the second positional argument or ``key=``) or
    ``NAME(f, params, batch, key, ...)`` (``f`` a function or an ``Objective``/``Risk``, then ``batch=None``).
    Checks ``key`` when required and places it with the operator."""
    if isinstance(f, CurvatureOperator):
        if batch is not None:
            raise TypeError(f"{name}(op, key, ...) takes an operator and a key; got an extra positional argument")
        if params is not None and key is not None:
            raise TypeError(f"{name}(op, key, ...) got key twice (positionally and as key=)")
        if microbatch_size is not None or devices is not None:
            raise ValueError(
                f"microbatch_size and devices belong to the operator (e.g. Hessian(f, params, batch, "
                f"microbatch_size=...)), not to {name}(op, ...)"
            )
        op, key = f, (params if key is None else key)
    else:
        if params is None:
            raise TypeError(f"{name}(f, params, batch, key, ...) needs params (got params=None)")
        objective = as_objective(f, batch, microbatch_size=microbatch_size, devices=devices)
        op = Hessian(objective, params)
    if key_required or key is not None:
        validation.check_key(key, "key")
        (key,) = op.place(key)
    return op, key
