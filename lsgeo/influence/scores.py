"""Influence scores: ``pairwise_scores`` (every training example against every query) and ``self_scores``.

Convention (Kronfluence's, Grosse et al. 2023 Eq. 5, without Koh & Liang's minus sign):

    I[i, q] = g_q^T (A + damping I)^-1 g_i,      g_i = grad_w l(phi_i(w), y_i)   (the loss of example i alone)

with ``A`` a curvature of the training objective as lsgeo's operators define it, the MEAN over the n training
examples (the Gauss-Newton matrix by default). Upweighting example ``j`` in the objective ``1/n sum_i l_i + eps
l_j`` moves the minimiser by ``-A^-1 g_j eps`` (A the Hessian), so ``d l_q / d eps = -I[j, q]``, and removing
``j`` (``eps = -1/n``) changes the query loss by ``+I[j, q] / n`` to first order: a positive score is a helpful
(proponent) example, a negative one harmful (opponent). Kronfluence leaves the ``1/n`` out as well.

Self-influence ``I[i, i] = g_i^T (A + d I)^-1 g_i`` (Koh & Liang 2017, Section 5.4; mislabelled examples score
high). ``by_group=True`` splits every score over the parameter groups (``lsgeo.groups``: top-level modules by
default): ``I_G[i, q] = sum_{c in G} ((A + d I)^-1 g_q)_c (g_i)_c``, which sum to ``I`` (Kronfluence's
``per_module_score`` for a block-diagonal ``A``; pass ``curvature.blocks`` of an operator for that).

At scale: the query gradients are preconditioned once, ``[Q, m]`` kept; the training gradients are formed
``examples_per_chunk`` at a time inside a compiled ``lax.map`` and contracted with them at once (memory:
``examples_per_chunk + Q`` vectors of size m, whatever n); the training data may be a data source (batches
from the host); ``out=path`` writes the rows to a ``.npy`` memmap block by block and resumes an interrupted run
(:mod:`lsgeo.influence.storage`), with a tqdm bar when ``progress=True``.

Cost: pairwise, one backward pass per training and query example plus Q inverse products (CG: a solve each)
plus ``n Q m`` multiply-adds; self, one backward pass and one inverse product per training example.

Example:
  >>> import jax.numpy as jnp
  >>> from lsgeo import influence, losses
  >>> predict = lambda w, x: x @ w
  >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 1.0])
  >>> influence.pairwise_scores(predict, losses.squared_loss, jnp.zeros(2), (x, y), (x, y), inverse="identity")
  array([[1., 0.],
         [0., 4.]], dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import validation
from lsgeo.influence import factored
from lsgeo.influence import gradients as grads_lib
from lsgeo.influence.inverse import check_converged, resolve_inverse
from lsgeo.influence.storage import open_scores
from lsgeo.per_example import ghost

__all__ = ["pairwise_scores", "self_scores", "DEFAULT_INVERSE", "METHODS"]

#: ``"ekfac"``: the DESIGN contract and Kronfluence's default
DEFAULT_INVERSE = "ekfac"
#: ``"fast"``: dense kernels by their factors where exact or asked for; ``"generic"``: every gradient formed
METHODS = ("fast", "generic")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stacked_gradients(predict, loss, chunk, params, x, y):
    return grads_lib.example_gradients(predict, loss, params, x, y, lambda g, i: g, chunk)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _pairwise_block(predict, loss, chunk, leaf_ids, num_groups, params, queries, x, y):
    return grads_lib.example_gradients(
        predict, loss, params, x, y, lambda g, i: grads_lib.group_dots(g, queries, leaf_ids, num_groups), chunk)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _self_block(predict, loss, chunk, leaf_ids, num_groups, fn, operands, params, x, y):
    def one(g, i):
        pg, ok = fn(operands, g)
        one_row = jax.tree_util.tree_map(lambda a: a[None], pg)
        return grads_lib.group_dots(g, one_row, leaf_ids, num_groups)[:, 0], ok

    return grads_lib.example_gradients(predict, loss, params, x, y, one, chunk)


def _check_model(predict, loss, params):
    validation.check_callable(predict, "predict")
    validation.check_callable(loss, "loss")
    validation.check_float_params(params)


def _check_chunks(examples_per_chunk, block_size):
    for value, name in ((examples_per_chunk, "examples_per_chunk"), (block_size, "block_size")):
        if value is not None:
            validation.check_positive_int(value, name)


def _query_gradients(predict, loss, params, query_data, chunk):
    parts = [_stacked_gradients(predict, loss, chunk, params, x, y)
             for _, x, y in grads_lib.blocks(query_data, None, "query_data")]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)


def _run_blocks(train_data, block_size, compute, shape_tail, dtype, names, by_group, out, progress, callback):
    """Calls ``compute(x, y) -> [b, M, ...]`` on every block of the training data; returns the scores (numpy,
    summed over the groups unless ``by_group``), written to ``out`` block by block when given."""
    if out is not None or progress:
        n, starts = grads_lib.count_examples(train_data, "train_data")
        if not grads_lib.is_source(train_data):
            size = n if block_size is None else block_size
            if out is not None and block_size is None:
                size = min(n, 1024)
            block_size, starts = size, list(range(0, n, size))
        num_blocks = len(starts)
    else:
        num_blocks = None
    row = ((len(names),) if by_group else ()) + tuple(shape_tail)
    store = None if out is None else open_scores(out, (n,) + row, dtype, num_blocks)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_blocks, desc="influence scores", unit="block")
    rows = []
    try:
        for b, (start, x, y) in enumerate(grads_lib.blocks(train_data, block_size, "train_data")):
            if store is not None and store.done[b]:
                if bar is not None:
                    bar.update(1)
                continue
            values = np.asarray(compute(x, y))
            values = values if by_group else values.sum(axis=1)
            values = values.astype(dtype)
            if store is None:
                rows.append(values)
            else:
                store.write(b, start, values)
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(b, num_blocks)
    finally:
        if bar is not None:
            bar.close()
    scores = np.asarray(store.array) if store is not None else np.concatenate(rows)
    if by_group:
        return {name: scores[:, g] for g, name in enumerate(names)}
    return scores


def _check_queries_match(train_data, query_data) -> None:
    """The queries' examples must have the shapes of the training examples (ValueError naming ``query_data``)."""
    _, xt, yt = next(grads_lib.blocks(train_data, None, "train_data"))
    _, xq, yq = next(grads_lib.blocks(query_data, None, "query_data"))
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: tuple(np.shape(a)[1:]), tree)  # noqa: E731
    if jax.tree_util.tree_structure((xt, yt)) != jax.tree_util.tree_structure((xq, yq)) or shapes((xt, yt)) != shapes(
            (xq, yq)):
        raise ValueError(f"query_data must hold examples shaped like train_data's: per-example (x, y) shapes "
                         f"{shapes((xq, yq))} against {shapes((xt, yt))}")


def _has_dense_kernels(predict, params, data) -> bool:
    """Whether some leaf is a dense kernel (the factored route's gain); one trace on the first block, no FLOPs."""
    _, x0, _ = next(grads_lib.blocks(data, None, "data"))
    return bool(factored.plan_for(predict, params, x0).sites)


def _factored(pre, predict, loss, params, query_data, chunk, queries_per_solve, query_rank, key, leaf_ids,
              num_groups):
    """``(compute, query factors)`` of the factored route; ``(None, preconditioned queries or None)`` where the model
    has no dense kernel or the tracer fails (then the dense route, with a warning)."""
    if not _has_dense_kernels(predict, params, query_data):
        return None, None
    _, x0, _ = next(grads_lib.blocks(query_data, None, "query_data"))
    exact_rows = query_rank is None and pre.name == "identity"
    preconditioned = None
    if not exact_rows:
        preconditioned = pre.apply(_query_gradients(predict, loss, params, query_data, chunk), queries_per_solve)
    try:
        if exact_rows:
            parts = [factored.query_factors(predict, loss, chunk, params, x, y)
                     for _, x, y in grads_lib.blocks(query_data, None, "query_data")]
            queries = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)
        else:
            rank = None if query_rank is None else int(query_rank)
            queries = factored.lowrank_query_factors(predict, rank, chunk, params, x0, preconditioned, key)
    except Exception as err:  # noqa: BLE001 - the tracer failed where its dry run did not: the dense route
        ghost.warn_fallback(f"{type(err).__name__}: {err}")  # (which raises a user error itself, if it is one)
        return None, preconditioned

    def compute(x, y):
        return factored.block_scores(predict, loss, chunk, leaf_ids, num_groups, params, queries, x, y)

    return compute, queries


def pairwise_scores(predict: Callable, loss: Callable, params, train_data, query_data, *, inverse=DEFAULT_INVERSE,
                    damping=None, by_group: bool = False, groups=None, curvature=None, key=None, rank: int = 32,
                    num_iters: int | None = None, tol: float = 1e-6, maxiter: int | None = None, num_probes: int = 30,
                    microbatch_size: int | None = None, examples_per_chunk: int | None = 64,
                    queries_per_solve: int | None = None, query_rank: int | None = None, method: str = "fast",
                    block_size: int | None = None, out=None, progress: bool = False, callback: Callable | None = None):
    """``[n_train, n_query]`` influence scores ``I[i, q] = g_q^T (A + damping I)^-1 g_i`` (module docstring).

    Args:
      predict: ``predict(params, x) -> [n, k]`` (examples must not interact).
      loss: ``loss(outputs, y) -> scalar``, the mean over examples.
      params: the trained parameters (a pytree).
      train_data: ``(x, y)`` or a data source (a zero-argument callable returning an iterator of batches).
      query_data: ``(x, y)`` or a data source of the queries.
      inverse: ``"ekfac"``, ``"kfac"``, ``"cg"``, ``"lowrank"``, ``"identity"``, a curvature operator, an object
        with ``inverse(damping)`` or a callable (``lsgeo.influence.inverse``).
      damping: ``d >= 0`` (``> 0`` for ``"lowrank"``), or None: ``0.1 tr(A) / m`` (Kronfluence's heuristic).
      by_group: return ``{group name: [n_train, n_query]}`` (they sum to the scores); ``groups`` as in lsgeo.groups.
      curvature: the operator ``A`` of ``"cg"`` / ``"lowrank"`` (default ``GaussNewton`` of ``train_data``, with
        ``microbatch_size``).
      key: PRNG key of the Lanczos start and the trace probes (default ``key(0)``).
      rank, num_iters: eigenpairs of ``"lowrank"`` (Lanczos steps, default ``max(2 rank + 20, 40)``).
      tol, maxiter: CG's relative residual and step cap (a solve that does not converge is a ValueError).
      num_probes: products of the Hutch++ trace behind ``damping=None``.
      examples_per_chunk: training gradients formed together (vmapped); None: the whole block.
      queries_per_solve: queries preconditioned together (vmapped); None: all.
      query_rank: keep the best rank-``query_rank`` approximation of every preconditioned query on each dense kernel
        (Kronfluence's low-rank query gradients; randomized SVD keyed by ``key``): the training gradients of dense
        kernels are then never formed (:mod:`lsgeo.influence.factored`). None: exact.
      method: ``"fast"``: dense kernels scored from their factors (layer input x output gradient,
        :mod:`lsgeo.influence.factored`): ``a_i P_q delta_i^T`` in one GEMM per chunk, exactly, or by the query's own
        rows (``"identity"``) or rank-``query_rank`` factors; ``"generic"``: every training gradient formed and
        contracted (the reference; the same numbers up to rounding).
      block_size: examples per host-level block of in-memory data (the unit written to ``out`` and counted by
        the progress bar; default all, or 1024 with ``out``); a data source's blocks are its batches.
      out: path of a ``.npy`` file to write the scores to (memmap; resumed if interrupted; returned memory-mapped).
      progress: show a tqdm progress bar over the blocks.
      callback: ``callback(block_index, num_blocks)`` after each block computed.

    Returns:
      numpy ``[n_train, n_query]`` (or the dict), in the parameters' dtype.
    """
    _check_model(predict, loss, params)
    _check_chunks(examples_per_chunk, block_size)
    validation.check_choice(method, "method", METHODS)
    if query_rank is not None:
        validation.check_positive_int(query_rank, "query_rank")
    _check_queries_match(train_data, query_data)
    pre = resolve_inverse(inverse, predict, loss, params, train_data, damping=damping, curvature_op=curvature, key=key,
                          rank=rank, num_iters=num_iters, tol=tol, maxiter=maxiter, num_probes=num_probes,
                          microbatch_size=microbatch_size)
    leaf_ids, names = grads_lib.leaf_groups(params, groups)
    key = jax.random.key(0) if key is None else key
    compute, queries = None, None
    if method == "fast":
        compute, queries = _factored(pre, predict, loss, params, query_data, examples_per_chunk, queries_per_solve,
                                     query_rank, key, leaf_ids, len(names))
    if compute is None:
        if queries is None:
            queries = pre.apply(_query_gradients(predict, loss, params, query_data, examples_per_chunk),
                                queries_per_solve)

        def compute(x, y):
            return _pairwise_block(predict, loss, examples_per_chunk, leaf_ids, len(names), params, queries, x, y)

    num_queries = jax.tree_util.tree_leaves(queries)[0].shape[0]
    dtype = np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(queries)))

    return _run_blocks(train_data, block_size, compute, (num_queries,), dtype, names, by_group, out, progress, callback)


def self_scores(predict: Callable, loss: Callable, params, train_data, *, inverse=DEFAULT_INVERSE, damping=None,
                by_group: bool = False, groups=None, curvature=None, key=None, rank: int = 32,
                num_iters: int | None = None, tol: float = 1e-6, maxiter: int | None = None, num_probes: int = 30,
                microbatch_size: int | None = None, examples_per_chunk: int | None = 64, method: str = "fast",
                block_size: int | None = None, out=None, progress: bool = False, callback: Callable | None = None):
    """``[n_train]`` self-influence ``I[i, i] = g_i^T (A + damping I)^-1 g_i``; arguments as :func:`pairwise_scores`.

    Cost: one backward pass and one inverse product per training example (with ``"cg"`` a CG solve each,
    ``examples_per_chunk`` of them vmapped); with ``inverse="identity"`` and ``method="fast"`` the squared norms of
    dense kernels' gradients come from their factors (ghost norms, :mod:`lsgeo.influence.factored`).

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import influence, losses
      >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 1.0])
      >>> influence.self_scores(lambda w, x: x @ w, losses.squared_loss, jnp.zeros(2), (x, y), inverse="identity")
      array([1., 4.], dtype=float32)
    """
    _check_model(predict, loss, params)
    _check_chunks(examples_per_chunk, block_size)
    validation.check_choice(method, "method", METHODS)
    pre = resolve_inverse(inverse, predict, loss, params, train_data, damping=damping, curvature_op=curvature, key=key,
                          rank=rank, num_iters=num_iters, tol=tol, maxiter=maxiter, num_probes=num_probes,
                          microbatch_size=microbatch_size)
    leaf_ids, names = grads_lib.leaf_groups(params, groups)
    dtype = np.dtype(jnp.promote_types(jnp.result_type(*jax.tree_util.tree_leaves(params)), jnp.float32))
    if method == "fast" and pre.name == "identity" and _has_dense_kernels(predict, params, train_data):
        def compute(x, y):
            return factored.self_block_scores(predict, loss, examples_per_chunk, leaf_ids, len(names), params, x, y)

        return _run_blocks(train_data, block_size, compute, (), dtype, names, by_group, out, progress, callback)

    def compute(x, y):
        values, ok = _self_block(predict, loss, examples_per_chunk, leaf_ids, len(names), pre.fn, pre.operands,
                                 params, x, y)
        check_converged(ok, pre.name)
        return values

    return _run_blocks(train_data, block_size, compute, (), dtype, names, by_group, out, progress, callback)
