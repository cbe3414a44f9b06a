"""The empirical neural tangent kernel Theta(x, x') = J(x) J(x')^T and its trace.

For ``predict(params, x) -> [n, k]`` (or ``[n]``, read as k = 1) and J_i = d phi_i / d w in R^{k x m}:

  empirical_ntk          Theta[i, j] = J_i J_j^T                  [n1, n2, k, k]  (or its trace over outputs [n1, n2])
  ntk_diagonal_blocks    J_i J_i^T                                [n, k, k]
  ntk_trace              sum_i tr(J_i J_i^T) = ||J||_F^2          scalar (or per parameter group)

For the squared loss L = 1/(2n) ||y - phi||^2 the Gauss-Newton trace of Orvieto et al. (2023) is
ntk_trace / n, so sigma^2/(2n) ntk_trace is the explicit regulariser of noise injection.

Reference: A. Jacot, F. Gabriel, C. Hongler, "Neural Tangent Kernel", NeurIPS 2018; R. Novak et al.,
"Fast finite width neural tangent kernel", ICML 2022 (the NTK-vector-product method used here).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import dataclasses
from collections.abc import Callable

from lsgeo import groups as groups_lib
from lsgeo import dataplan, per_example
from lsgeo.objective import Objective, Risk, compiled
from lsgeo.validation import check_batch, check_callable, check_choice, check_float_params, check_positive_int

__all__ = ["empirical_ntk", "ntk_diagonal_blocks", "ntk_trace"]

_CHUNK_BUDGET = dataplan.MEMORY_BUDGET_BYTES // 4  # float32 numbers of per-example rows per automatic chunk


def _check(predict, params, x, name="x"):
    check_callable(predict, "predict")
    check_float_params(params)
    check_batch(x, name, common_axis=True)


def empirical_ntk(predict, params, x1, x2=None, *, trace_outputs=True, examples_per_chunk=None):
    """The empirical NTK J(x1) J(x2)^T by NTK-vector products (Novak et al. 2022, Section 3.2).

    ``predict`` is linearised once on ``x1`` (``jax.linearize``). The examples of ``x2`` are taken
    ``examples_per_chunk`` at a time; for each, the k per-example rows J_j^T e_c come from VJPs of the
    one-example predictor and are pushed through the linearisation: Theta[:, j, :, c] = J(x1) J_j^T e_c.

    Args:
      predict: ``predict(params, x) -> [n, k] or [n]``; examples must not interact.
      params: parameter pytree.
      x1: ``[n1, ...]`` inputs; x2: ``[n2, ...]`` inputs (default: ``x1``).
      trace_outputs: return the trace over outputs ``[n1, n2]`` (else ``[n1, n2, k, k]`` with
        Theta[i, j, c, c'] = <d phi_ic / dw, d phi'_jc' / dw>).
      examples_per_chunk: examples of ``x2`` per chunk (``None``: automatic, ~256 MB of per-example rows).

    Returns:
      ``[n1, n2]`` or ``[n1, n2, k, k]``. Cost: n2 k JVPs over ``x1`` (n1 n2 k one-example forward
      passes) plus n2 k one-example VJPs. Memory: examples_per_chunk k (m + n1 k) plus one linearisation on x1.
    """
    _check(predict, params, x1, "x1")
    if x2 is None:
        x2 = x1
    check_batch(x2, "x2", common_axis=True)
    if examples_per_chunk is not None:
        check_positive_int(examples_per_chunk, "examples_per_chunk")
    return _empirical_ntk_jit(predict, bool(trace_outputs), examples_per_chunk, params, x1, x2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _empirical_ntk_jit(predict, trace_outputs, examples_per_chunk, params, x1, x2):
    n1 = jax.tree_util.tree_leaves(x1)[0].shape[0]
    n2 = jax.tree_util.tree_leaves(x2)[0].shape[0]
    single = per_example.single_example(predict)
    k = int(np.prod(jax.eval_shape(single, params, jax.tree_util.tree_map(lambda a: a[0], x2)).shape))
    m = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    if examples_per_chunk is None:
        chunk = int(max(1, min(n2, _CHUNK_BUDGET // max(1, k * (m + n1 * k)))))
    else:
        chunk = int(min(examples_per_chunk, n2))

    def f1(p):
        return predict(p, x1).reshape(n1, -1)

    _, jvp1 = jax.linearize(f1, params)

    def one(xj):
        phi, vjp_fn = jax.vjp(lambda p: single(p, xj), params)
        (rows,) = jax.vmap(vjp_fn)(jnp.eye(phi.shape[0], dtype=phi.dtype))  # J_j^T e_c, leaves [k, ...]
        cols = jax.vmap(jvp1)(rows)  # [k (of x2), n1, k (of x1)]
        if trace_outputs:
            return jnp.einsum("cic->i", cols)
        return jnp.transpose(cols, (1, 2, 0))  # [n1, k1, k2]

    out = jax.lax.map(one, x2, batch_size=chunk)  # [n2, n1, ...]
    return jnp.swapaxes(out, 0, 1)


def ntk_diagonal_blocks(predict, params, x, *, examples_per_chunk=None, method="fast"):
    """Per-example blocks J_i J_i^T ``[n, k, k]`` (the diagonal of :func:`empirical_ntk`), chunked.

    See :func:`lsgeo.per_example.gram_blocks`: cost about k backward passes of the one-example model
    per example, ghost norms for dense layers (``method="fast"``), per-example VJPs otherwise.
    """
    _check(predict, params, x)
    return per_example.gram_blocks(predict, params, x, examples_per_chunk=examples_per_chunk, method=method)


def ntk_trace(
    predict,
    params,
    x,
    *,
    by_layer=False,
    groups=None,
    examples_per_chunk=None,
    method="fast",
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """tr Theta(x, x) = sum_i tr(J_i J_i^T) = sum_{i, c} ||d phi_ic / dw||^2, exact.

    Args:
      predict, params, x: the model contract; examples must not interact.
      by_layer: return ``{group: sum_i tr(J_{i,g} J_{i,g}^T)}`` (sums to the total).
      groups: ``None`` (top-level modules), ``"leaf"`` or a callable on the leaf path.
      examples_per_chunk: examples per chunk (``None``: automatic).
      method: ``"fast"`` (ghost norms for dense layers, generic fallback) or ``"generic"``.
      microbatch_size: ``None`` or examples per microbatch: the trace over all of ``x`` as the sum of the
        traces of its microbatches, computed in a ``lax.scan`` in the memory of one microbatch and
        sharded over ``devices`` (default ``jax.devices()``); see :mod:`lsgeo.dataplan`.

    ``predict`` may also be an ``lsgeo.Risk`` (then ``x=None``: its data's inputs, its plan). ``x`` may be a data
    source of input batches. With microbatches, a ``predict`` that couples the examples of a batch (BatchNorm in
    training mode) is a ValueError (its per-example Jacobians would depend on the cut).

    Returns:
      A scalar or a dict of scalars. Cost: k backward passes of the one-example model per example
      (batched), i.e. about k full-batch backward passes; memory O(examples_per_chunk k width) on the fast
      path, O(examples_per_chunk k m) for leaves on the generic path.

    Raises:
      TypeError: ``predict`` not callable. ValueError: integer ``params``, an empty ``x`` or leaves of
      ``x`` that disagree on n, a bad ``examples_per_chunk``/``microbatch_size``/``method``/``groups``.
    """
    if isinstance(predict, Risk):
        if x is not None or microbatch_size is not None or devices is not None:
            raise ValueError("predict is a Risk, which holds its data and plan: pass x=None and no microbatch_size/devices")
        objective, inputs = predict, _first
        predict = objective.predict
    else:
        check_callable(predict, "predict")
        objective = Objective(_MeanPrediction(predict), x, microbatch_size=microbatch_size, devices=devices,
                              data_name="x")
        inputs = _whole
    objective.check(params)
    if examples_per_chunk is not None:
        check_positive_int(examples_per_chunk, "examples_per_chunk")
    check_choice(method, "method", per_example.METHODS)
    _, names = groups_lib.group_ids(params, groups)
    (params,) = objective.place(params)
    per_group = _ntk_trace(objective, predict, inputs, groups, method, examples_per_chunk, params)
    if by_layer:
        return {name: per_group[g] for g, name in enumerate(names)}
    return jnp.sum(per_group)


def _per_group_trace(predict, groups, method, examples_per_chunk, params, x):
    grams, _, _ = per_example.per_example_grams(
        predict, params, x, diag=True, groups=groups, method=method, examples_per_chunk=examples_per_chunk
    )
    return jnp.sum(grams, axis=(0, 2))


@dataclasses.dataclass(frozen=True)
class _MeanPrediction:
    """``mean(predict(params, x))``: a mean over examples exactly when the examples' predictions are independent
    (what the objective's check tests before a cut)."""

    predict: Callable

    def __call__(self, params, x):
        return jnp.mean(self.predict(params, x))


def _first(batch):
    return batch[0]


def _whole(batch):
    return batch


@compiled(static_argnums=(1, 2, 3, 4, 5))
def _ntk_trace(objective, predict, inputs, groups, method, examples_per_chunk, params):
    return objective.map(lambda p, mb: _per_group_trace(predict, groups, method, examples_per_chunk, p, inputs(mb)),
                         params, mean=False)
