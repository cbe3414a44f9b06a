"""The check that an objective is a mean over independent examples, the precondition of every cut.

A BatchNorm layer in training mode couples the examples of a microbatch through its batch statistics; so
does any objective that is not a mean over examples (a sum, a median). Its "data-set value" by
microbatches would silently depend on the cut. ``check_mean_over_examples`` compares, on two disjoint
pieces A and B of the batch (the first two microbatches, or the first one and the uneven remainder, or
the shares of two devices of a sharded batch),

    f(A u B)  against  (|A| f(A) + |B| f(B)) / (|A| + |B|),

three eager evaluations on at most two microbatches, tolerance ``1000 eps`` relative to the values.

A data source's batches are its microbatches: its first two batches are the pieces A and B (two batches
read from one fresh iterator, once per objective and plan).

A batch used whole (or as one microbatch, or a source of one batch) is not cut, so coupling is harmless there, but a SUM over examples (not a mean) still gives
wrong numbers (``EmpiricalFisher`` n^2 too large, the Gauss-Newton trace and R_eff of another L). A mean is
invariant to duplicating the examples, a sum doubles: on the first ``min(n, 32)`` examples P,

    f(P)  against  f(P u P),

two eager evaluations on at most 64 examples (a batch-coupled mean such as BatchNorm in training mode passes:
the statistics of P u P are those of P). Skipped for a batch whose leaves do not share a leading example axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.dataplan.memory import Layout
from lsgeo.validation import is_concrete

__all__ = ["check_mean_over_examples", "probe_pieces", "source_pieces", "duplicated_piece"]

_DUPLICATE_EXAMPLES = 32  # examples of the duplication check on a whole batch

_CHECKED: dict = {}  # (fn, plan) pairs already checked, oldest first (at most _MAX_CHECKED kept)
_MAX_CHECKED = 128


def probe_pieces(batch, plan):
    """``(A, B)``: the first ``s`` examples of ``batch`` and the next ``min(s, n - s)``, two pieces that ``plan``
    evaluates separately (``s`` its microbatch size: a second microbatch, the uneven remainder, or another
    device's share); None when the plan uses the batch whole or the batch is not in this process's memory."""
    if plan.whole or isinstance(batch, Layout) or plan.num_examples <= plan.size:
        return None
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not all(getattr(a, "is_fully_addressable", True) and np.ndim(a) for a in leaves):
        return None
    s = plan.size
    b = min(s, plan.num_examples - s)
    return jax.tree_util.tree_map(lambda x: x[:s], batch), jax.tree_util.tree_map(lambda x: x[s : s + b], batch)


def source_pieces(source: Callable):
    """``(first, second)``: the first two batches of a data source (a zero-argument callable returning a fresh
    iterator of batches), the pieces its plan evaluates separately; ``second`` None for a source of one batch."""
    batches = iter(source())
    first, second = next(batches, None), next(batches, None)
    return first, second


def duplicated_piece(batch):
    """``(P, P u P)``: the first ``min(n, 32)`` examples of ``batch`` and the same examples twice; None when the
    leaves of ``batch`` do not share a leading example axis in this process's memory."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not all(getattr(a, "is_fully_addressable", True) and np.ndim(a) for a in leaves):
        return None
    sizes = {np.shape(a)[0] for a in leaves}
    if len(sizes) != 1:
        return None
    m = min(sizes.pop(), _DUPLICATE_EXAMPLES)
    piece = jax.tree_util.tree_map(lambda x: jnp.asarray(x[:m]), batch)
    return piece, jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), piece)


def check_mean_over_examples(fn: Callable, params, batch, plan, *, name: str = "f") -> None:
    """Raises ValueError when the scalar ``fn(params, batch)`` is evidently not a mean over independent
    examples (see the module docstring), once per (``fn``, plan): with a cut, by comparing two pieces with
    their union; with the batch whole, by duplicating a piece (a sum over examples is refused). Nothing is
    checked under tracing."""
    if not (is_concrete(params) and is_concrete(batch)):
        return
    try:
        token = (fn, plan)
        if token in _CHECKED:
            return
    except TypeError:  # an unhashable fn: check every time
        token = None
    pieces = probe_pieces(batch, plan)
    source = getattr(plan, "source", None)
    if pieces is None and callable(source):  # a data source: its first two batches, the pieces its plan cuts
        first, second = source_pieces(source)
        batch, pieces = (first, None) if second is None else (batch, (first, second))
    # not cut (a whole batch, one microbatch holding every example, a source of one batch): the sum check
    duplicate = duplicated_piece(batch) if pieces is None and batch is not None else None
    if pieces is None and duplicate is None:
        return
    if duplicate is not None:
        _check_duplicated(fn, params, *duplicate, name)
    else:
        _check_cut(fn, params, *pieces, plan, name)
    if token is not None:
        _CHECKED[token] = None
        if len(_CHECKED) > _MAX_CHECKED:
            del _CHECKED[next(iter(_CHECKED))]


def _check_scalars(values, name) -> None:
    shapes = {np.shape(v) for v in values}
    if shapes != {()}:
        raise ValueError(f"{name} must return a scalar (a mean over the examples of its batch), got shape "
                         f"{next(iter(shapes - {()}))}")


def _eps(params) -> float:
    return float(jnp.finfo(jnp.result_type(*jax.tree_util.tree_leaves(params))).eps)


def _check_duplicated(fn, params, piece, twice, name) -> None:
    try:
        values = [fn(params, b) for b in (piece, twice)]
    except Exception:  # noqa: BLE001 (an f that takes only its own batch shape: its call on the data will tell)
        return
    if not is_concrete(values):  # called inside an outer jit: nothing to check
        return
    _check_scalars(values, name)
    v1, v2 = (np.asarray(v, np.float64) for v in values)
    if not (np.isfinite(v1) and np.isfinite(v2)):
        return
    if abs(float(v2) - float(v1)) > 1000 * _eps(params) * max(abs(float(v1)), abs(float(v2)), 1e-30):
        m = jax.tree_util.tree_leaves(piece)[0].shape[0]
        raise ValueError(
            f"{name} is not a mean over examples: on {m} examples it gives {float(v1):.6g}, and {float(v2):.6g} on the "
            f"same examples twice (a mean would not change; a sum doubles). Every lsgeo function takes the mean over "
            f"examples (the paper's L; EmpiricalFisher, the Gauss-Newton trace and R_eff would be off by powers of "
            f"n): divide by the number of examples (jnp.mean instead of jnp.sum over the batch)"
        )


def _check_cut(fn, params, first, second, plan, name) -> None:
    sizes = [jax.tree_util.tree_leaves(p)[0].shape[0] for p in (first, second)]
    both = jax.tree_util.tree_map(lambda x, y: jnp.concatenate([jnp.asarray(x), jnp.asarray(y)]), first, second)
    values = [fn(params, b) for b in (first, second, both)]
    if not is_concrete(values):  # called inside an outer jit: nothing to check
        return
    _check_scalars(values, name)
    values = [np.asarray(v, np.float64) for v in values]
    if all(np.isfinite(v) for v in values):
        eps = _eps(params)
        v1, v2, v12 = (float(v) for v in values)
        mean = (sizes[0] * v1 + sizes[1] * v2) / (sizes[0] + sizes[1])
        if abs(v12 - mean) > 1000 * eps * max(abs(v1), abs(v2), abs(v12), 1e-30):
            raise ValueError(
                f"{name} is not a mean over independent examples: on two pieces of {sizes[0]} and {sizes[1]} examples "
                f"it gives {v1:.6g} and {v2:.6g}, but {v12:.6g} on both together (their example-weighted mean is "
                f"{mean:.6g}). Cut into microbatches ({plan.describe()}) the data-set value would depend on the cut. "
                f"A BatchNorm layer in training mode does this: bind its running statistics (evaluation mode), e.g. "
                f"lsgeo.models.make_predict(model, model_state); or pass microbatch_size=None to use the batch whole"
            )
