"""The data-set objective, built once: the one way every lsgeo function evaluates on data.

``Objective(f, data, *, microbatch_size=None, devices=None)`` is ``F(w) = f(w, data)`` for an objective
``f(params, batch) -> scalar`` that is a mean over the examples of ``data``; ``Risk(predict, loss, data, ...)``
is the objective ``R(w) = L(Phi(w))`` that also knows its predictor and loss (what the Gauss-Newton and
Fisher matrices and the effective risk need). ``data`` is an in-memory batch, a data source (a zero-argument
callable returning a fresh iterator of batches) or a global batch sharded along its examples over
processes. When it is built, the data is validated, its plan chosen (``lsgeo.dataplan``: the cut into
microbatches, the devices), and it is laid out and placed, once; ``check(params)`` then runs the checks
that need parameters (floating parameters, the mean-over-examples check, the label check of a ``Risk``),
which the operators and geometry functions call when they are given an objective.

An objective is a pytree (a frozen dataclass registered with ``lsgeo.pytree_classes.register_dataclass``): the
data is its leaf; the functions and the plan are static. It passes through ``jit``, and everything that
evaluates on data uses its three primitives:

  ``value(params)``                  F(w), the example-weighted mean over microbatches (traceable);
  ``value_and_grad(params)``          with a memory-bounded gradient (one microbatch's activations);
  ``map(fn, operands, mean=True)``   ``sum_j c_j fn(operands, B_j)``, the per-microbatch map (c_j = n_j / n).

Example:
  >>> import jax.numpy as jnp
  >>> import lsgeo
  >>> x, y = jnp.arange(6.0)[:, None], jnp.ones(6)
  >>> risk = lsgeo.Risk(lambda w, x: x @ w, lsgeo.losses.squared_loss, (x, y), microbatch_size=4)
  >>> round(float(risk.value(jnp.ones(1))), 4)  # mean of (x_i - 1)^2 / 2
  2.5833
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lsgeo import dataplan, pytree_classes, validation

__all__ = [
    "Objective",
    "Risk",
    "DataSetObjective",
    "as_objective",
    "objective_at",
    "mean_risk",
    "check_scalar",
    "compiled",
    "user_errors",
    "is_source",
    "check_not_iterator",
]

PyTree = Any
_STATIC = {"static": True}

#: whether data is a data source (a zero-argument callable returning a fresh iterator of batches)
is_source = dataplan.is_source
#: a ValueError naming the remedy when data is a generator / iterator (read once) where a source is meant
check_not_iterator = dataplan.check_not_iterator
#: ``fn`` with a data source's host-side errors re-raised as themselves (``lsgeo.dataplan.user_errors``)
user_errors = dataplan.user_errors


def compiled(fn: Callable | None = None, /, **jit_options) -> Callable:
    """``jax.jit(fn, **jit_options)`` for a program that evaluates an objective on data, with the errors of a data
    source reaching the caller as themselves: a source whose batches change between passes is the ``ValueError``
    ``dataplan.SourceChanged``, a source that fails on a later pass raises its own ``OSError`` (JAX would report
    either as a ``JaxRuntimeError`` of its host callback). The one wrapper every lsgeo function that evaluates on
    data compiles through; the result is waited for (``jax.block_until_ready``) so that the error arrives at the
    call. Used as ``@compiled`` or ``@compiled(static_argnames=...)``.
    """
    if fn is None:
        return lambda f: compiled(f, **jit_options)
    return user_errors(jax.jit(fn, **jit_options))


def check_scalar(value, name: str, what: str) -> None:
    """Trace-time check that ``value`` (an objective or a loss) is a scalar."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must return a scalar ({what}), got shape {jnp.shape(value)}")


@dataclasses.dataclass(frozen=True)
class mean_risk:  # noqa: N801 (a hashable function: equal for equal (predict, loss), so compile caches hit)
    """``R(params, (x, y)) = loss(predict(params, x), y)``."""

    predict: Callable
    loss: Callable

    def __call__(self, params, batch):
        x, y = batch
        return self.loss(self.predict(params, x), y)


@dataclasses.dataclass(frozen=True, repr=False)
class DataSetObjective:
    """What ``Objective`` and ``Risk`` share: the keyword-only settings (``microbatch_size``, ``devices``; the
    ``plan`` they give, set once when built; ``data_name``, the data's name in error messages), the plan's
    primitives and the checks."""

    _: dataclasses.KW_ONLY
    microbatch_size: int | None = dataclasses.field(default=None, metadata=_STATIC)
    devices: Sequence | None = dataclasses.field(default=None, metadata=_STATIC)
    plan: Any = dataclasses.field(default=None, metadata=_STATIC)
    data_name: dataclasses.InitVar[str] = "data"

    _functions: ClassVar[tuple] = ()  # the names of the callables the subclass holds (checked when built)

    def __post_init__(self, data_name):
        """Built once: the callables and the data validated, the plan chosen, the data laid out and placed
        (skipped when ``plan`` is given: a copy by ``replace`` or ``tree_unflatten``)."""
        if self.plan is not None:
            return
        for name in self._functions:
            validation.check_callable(getattr(self, name), name)
        self._check_data(data_name)
        plan = dataplan.plan(self.data, self.microbatch_size, devices=self.devices, name=data_name)
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "data", plan.layout(self.data))
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))

    def _check_data(self, data_name: str) -> None:
        """The subclass's own check of ``data`` before it is planned (none by default)."""

    # -- primitives (traceable) ----------------------------------------------------------------------
    def value(self, params) -> jax.Array:
        """``F(w)``, the data-set value; under ``jax.grad`` a memory-bounded gradient (``dataplan.dataset_objective``)."""
        return dataplan.dataset_objective(self.f, self.plan)(params, self.data)

    def value_and_grad(self, params):
        """``(F(w), grad F(w))``: one gradient per microbatch, only the accumulated gradient kept."""
        return jax.value_and_grad(self.value)(params)

    def grad(self, params) -> PyTree:
        return jax.grad(self.value)(params)

    def map(self, fn: Callable, operands: PyTree, *, mean: bool = True) -> PyTree:
        """``sum_j c_j fn(operands, B_j)`` over the microbatches (``dataplan.reduce``): ``c_j = n_j / n`` or 1."""
        return dataplan.reduce(fn, operands, self.data, self.plan, mean=mean)

    def place(self, *trees) -> tuple:
        """``trees`` replicated over the plan's devices (unchanged with one device or under tracing)."""
        return self.plan.place(*trees)

    def microbatch_struct(self) -> PyTree:
        """``jax.ShapeDtypeStruct`` pytree of one full microbatch."""
        return self.plan.struct(self.data)

    def without_data(self):
        """The same objective with no data (an operand of ``map``, whose data travels separately)."""
        return dataclasses.replace(self, data=None)

    @property
    def num_examples(self) -> int:
        return self.plan.num_examples

    @property
    def holds_batch(self) -> bool:
        """Whether ``data`` is the batch as given (in memory or sharded): neither a data source nor cut into a
        microbatch layout."""
        return not isinstance(self.plan, dataplan.StreamPlan) and not isinstance(self.data, dataplan.Layout)

    # -- checks ----------------------------------------------------------------------------------------
    def check(self, params, name: str = "params") -> None:
        """The checks that need parameters: ``params`` floating point, the objective a mean over independent
        examples when the plan cuts the data (cheap: three evaluations on two microbatches, once per plan)."""
        validation.check_float_params(params, name)
        dataplan.check_mean_over_examples(self.f, params, self.data, self.plan, name=self._name)

    def replace(self, **changes):
        """A copy with fields replaced; new ``data``, ``microbatch_size`` or ``devices`` rebuild the plan."""
        if not changes.keys() & {"data", "microbatch_size", "devices"}:
            return dataclasses.replace(self, **changes)
        if "data" not in changes and isinstance(self.data, dataplan.Layout):
            raise ValueError("replace(microbatch_size=/devices=) needs data= too: this objective's data is laid out")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes
        fields["plan"] = None
        return type(self)(**fields)

    def __repr__(self):
        return f"{type(self).__name__}({self._name}, {self.plan.num_examples} examples, {self.plan.describe()})"


@dataclasses.dataclass(frozen=True, repr=False)
class Objective(DataSetObjective):
    """``F(w) = f(w, data)`` on a batch or a data set, built once (see the module docstring).

    Args:
      f: ``f(params, batch) -> scalar``, a mean over the examples of ``batch``.
      data: the batch (a pytree; with microbatches its leaves share a leading example axis n), a data
        source (zero-argument callable returning a fresh iterator of batches) or a global batch sharded along
        its examples. ``None`` for an objective that ignores its batch (a test function of the parameters).
      microbatch_size: None (the batch at once, or a source's own batches) or the examples per microbatch.
      devices: devices the microbatches are sharded over (default ``jax.devices()``).

    Raises:
      TypeError: ``f`` not callable. ValueError: an empty batch, leaves that disagree on n, a bad
      ``microbatch_size`` or ``devices``, a generator object in place of a source (pass the function), a
      source whose batches disagree in structure.
    """

    f: Callable = dataclasses.field(metadata=_STATIC)
    data: PyTree = None

    _name = "f"
    _functions = ("f",)


@dataclasses.dataclass(frozen=True, repr=False)
class Risk(DataSetObjective):
    """``R(w) = L(Phi(w))`` on a batch ``(x, y)`` or a data set of such batches, built once.

    Args:
      predict: ``predict(params, x) -> [n, k]`` (or ``[n]``).
      loss: ``loss(outputs, y) -> scalar``, a mean over examples.
      data: ``(x, y)``, a data source of ``(x, y)`` batches, or a sharded global ``(x, y)``.
      microbatch_size, devices: as in ``Objective``.

    ``check(params)`` also checks that ``predict`` returns an array and runs the loss's target checks (class
    labels in ``[0, k)``, signs in {-1, +1}) on every label: the in-memory batch, each device's share of a
    sharded batch, each batch of a source (one host pass, no device work).
    """

    predict: Callable = dataclasses.field(metadata=_STATIC)
    loss: Callable = dataclasses.field(metadata=_STATIC)
    data: PyTree = None

    _name = "loss(predict(...))"
    _functions = ("predict", "loss")

    def _check_data(self, data_name: str) -> None:
        """``data`` a pair ``(x, y)`` (or a data source of such pairs)."""
        if not dataplan.is_source(self.data):
            dataplan.check_not_iterator(self.data, data_name)
            if not isinstance(self.data, (tuple, list)) or len(self.data) != 2:
                raise ValueError(f"{data_name} must be a pair (x, y) for a Risk, got {type(self.data).__name__}")
            object.__setattr__(self, "data", tuple(self.data))

    @property
    def f(self) -> Callable:
        """``f(params, (x, y)) = loss(predict(params, x), y)``."""
        return mean_risk(self.predict, self.loss)

    def check(self, params, name: str = "params") -> None:
        validation.check_float_params(params, name)
        for x, y in self._label_batches():
            out = jax.eval_shape(self.predict, params, x)
            if not isinstance(out, jax.ShapeDtypeStruct):
                raise ValueError(f"predict must return an array of outputs [n, k] or [n], got {type(out).__name__}")
            validation.check_loss_targets(self.predict, self.loss, params, (x, y))
        dataplan.check_mean_over_examples(self.f, params, self.data, self.plan, name=self._name)

    def _label_batches(self):
        """The ``(x, y)`` pieces whose labels this process can read: the batch, each addressable share of a
        sharded batch, or each batch of a source."""
        if isinstance(self.plan, dataplan.StreamPlan):
            yield from self.plan.source()
        elif isinstance(self.data, dataplan.Layout):
            yield jax.tree_util.tree_map(lambda a: a[0], self.data.full)
            if self.data.rest is not None:
                yield self.data.rest
        elif isinstance(self.plan, dataplan.ShardedPlan):
            x, y = self.data
            for i in range(len(y.addressable_shards)):
                yield jax.tree_util.tree_map(lambda a: a.addressable_shards[i].data, x), y.addressable_shards[i].data
        elif self.data is not None and validation.is_concrete(self.data):
            yield self.data


def objective_at(f, params, batch=None, *, microbatch_size=None, devices=None, name: str = "params"):
    """``as_objective(f, batch, ...)`` checked at ``params`` (``objective.check``: floating point; a cut objective
    must be a mean over examples, a batch-coupled one is a ValueError naming the remedy): what the geometry
    functions (``landscape``, ``sharpness``) evaluate."""
    objective = as_objective(f, batch, microbatch_size=microbatch_size, devices=devices)
    objective.check(params, name)
    return objective


def as_objective(f, batch=None, *, microbatch_size=None, devices=None, name: str = "f") -> DataSetObjective:
    """``f`` itself when it is an ``Objective``/``Risk`` (then ``batch``, ``microbatch_size`` and ``devices`` must
    be None: they belong to the objective), else ``Objective(f, batch, microbatch_size=..., devices=...)``: the
    one place the positional forms ``NAME(f, params, batch, ..., microbatch_size=, devices=)`` build theirs."""
    if isinstance(f, DataSetObjective):
        if batch is not None or microbatch_size is not None or devices is not None:
            raise ValueError(
                f"{name} is an {type(f).__name__}, which holds its data and plan: pass batch=None and no "
                f"microbatch_size/devices (they belong to the objective: {type(f).__name__}(..., microbatch_size=...))"
            )
        return f
    return Objective(f, batch, microbatch_size=microbatch_size, devices=devices, data_name="batch")


pytree_classes.register_dataclass(Objective)
pytree_classes.register_dataclass(Risk)
