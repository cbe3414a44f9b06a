"""Per-example Jacobian Gram blocks and per-example squared gradient norms.

For a predictor ``predict(params, x) -> [n, k]`` (or ``[n]``, read as ``k = 1``) whose examples do not
interact (``phi_i`` depends on ``x_i`` only: no batch statistics), write
J_i = d phi_i / d w in R^{k x m} for the Jacobian of example i. This module computes, without ever
holding all n per-example Jacobians at once,

  G_i       = J_i J_i^T                      in R^{k x k}    (the diagonal blocks of the empirical NTK)
  G_i^(g)   = J_{i,g} J_{i,g}^T                              (the same, restricted to a parameter group g)
  V_i J_i J_i^T V_i^T   for r cotangents V_i in R^{r x k}    (diagonal: ||J_i^T v_ic||^2)

These are the quantities behind tr(D2L(Phi) DPhi DPhi^T) of Orvieto et al. (AISTATS 2023) and the
NTK trace; see :mod:`lsgeo.risk` and :mod:`lsgeo.ntk`.

Two methods. Both run one ``jax.vjp`` of the one-example predictor per example, pulled back along
the r cotangents with ``vmap``, ``examples_per_chunk`` examples at a time (``vmap`` inside a ``lax.map``).

``method="generic"``: the backward pass forms the r per-example gradients J_i^T v_ic (r x m numbers)
of every leaf, whose Gram is formed and discarded. Always correct. Cost: r backward passes per
example; memory r x m x examples_per_chunk.

``method="fast"`` (default): the ghost-norm trick of Goodfellow (2015) / BackPACK (Dangel et al.
2020), applied automatically by :mod:`lsgeo.per_example.ghost`. A dense kernel (a leaf used once in
a ``dot_general``, z = a W) gets a zero "tap" t added to its output; the backward pass goes to the
taps, D_i = d phi_i / d t, and the Gram is ||a_i||^2 D_i D_i^T (sum_{t,t'} <a_it, a_it'> <D_it, D_it'>
with T > 1 rows per example): the r x (d_in x d_out) per-example gradient is never formed. All other
leaves (biases, scales, convolutions, shared weights, anything the tracer does not know) have their
per-example gradients formed directly, in the same backward pass. If the tracer fails on the
installed JAX or on the model, every leaf takes the generic route (a
:class:`FastPathFallbackWarning` says so); the numbers are the same. Cost: about r backward passes
of the one-example model per example (batched), plus O(r^2 d) per dense layer of width d; memory
examples_per_chunk x r x (sum of layer widths) plus the per-example gradients of the non-dense leaves.
:func:`fast_path_plan` reports which leaves take which route.

Reference: F. Dangel, F. Kunstner, P. Hennig, "BackPACK: Packing more into backprop", ICLR 2020;
I. Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import groups as groups_lib
from lsgeo.dataplan.budget import MEMORY_BUDGET_BYTES
from lsgeo.per_example import ghost
from lsgeo.per_example.single import single_example_leaves
from lsgeo.validation import check_choice, check_positive_int

__all__ = ["METHODS", "fast_path_plan", "gram_blocks", "per_example_grams", "sq_grad_norms"]

METHODS = ("fast", "generic")

_CHUNK_BUDGET = MEMORY_BUDGET_BYTES // 4  # float32 numbers per chunk of the automatic chunk size


def _example_count(x) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError("x must contain at least one array with a leading example axis")
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"x must have one leading example axis shared by all its leaves; got shapes "
                         f"{[np.shape(a) for a in leaves]}")
    return int(sizes.pop())


def _resolve_chunk(examples_per_chunk, n, per_example_floats):
    if examples_per_chunk is None:
        return int(max(1, min(n, _CHUNK_BUDGET // max(1, per_example_floats))))
    return int(min(examples_per_chunk, n))


def per_example_grams(
    predict,
    params,
    x,
    *,
    cotangent_fn: Callable | None = None,
    aux=None,
    num_cotangents: int | None = None,
    diag: bool = False,
    groups=None,
    method: str = "fast",
    examples_per_chunk: int | None = None,
):
    """The engine behind this module: per-example, per-group Grams of J_i^T V_i^T.

    Args:
      predict: ``predict(params, x) -> [n, k] or [n]``; examples must not interact.
      params: parameter pytree.
      x: inputs, an array (or pytree of arrays) with leading example axis n.
      cotangent_fn: ``cotangent_fn(phi_i, aux_i) -> V_i [r, k]``, the cotangents of example i given its
        outputs phi_i ``[k]`` and its slice of ``aux``; ``None`` uses V_i = I_k (r = k).
      aux: pytree with leading axis n passed to ``cotangent_fn`` (e.g. targets); may be None.
      num_cotangents: r (needed to size chunks when ``cotangent_fn`` is given; defaults to k).
      diag: return only the diagonal ||J_i^T v_ic||^2.
      groups: parameter groups (see :mod:`lsgeo.groups`).
      method: ``"fast"`` or ``"generic"`` (see the module docstring).
      examples_per_chunk: examples per chunk; ``None`` picks one for ~256 MB of float32 intermediates.

    Returns:
      ``(grams, names, outputs)``: grams ``[n, M, r, r]`` (``[n, M, r]`` if ``diag``) for the M groups
      ``names``, and the predictions ``[n, k]`` (as a matrix). Cost: r backward passes of the
      one-example model per example (see the module docstring for memory).

    >>> import jax.numpy as jnp
    >>> predict = lambda p, x: x @ p["w"] + p["b"]
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> grams, names, phi = per_example_grams(predict, params, jnp.ones((4, 3)), diag=True)
    >>> grams.shape, names, phi.shape
    ((4, 2, 2), ['b', 'w'], (4, 2))
    >>> grams[0].tolist()  # ||d phi_c / d b||^2 = 1, ||d phi_c / d w||^2 = ||x_i||^2 = 3
    [[1.0, 1.0], [3.0, 3.0]]
    """
    check_choice(method, "method", METHODS)
    if examples_per_chunk is not None:
        check_positive_int(examples_per_chunk, "examples_per_chunk")
    _example_count(x)
    _, names = groups_lib.group_ids(params, groups)
    grams, phi = _grams_jit(predict, cotangent_fn, num_cotangents, diag, groups, method, examples_per_chunk, params, x, aux)
    return grams, names, phi


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _grams_jit(predict, cotangent_fn, num_cotangents, diag, groups, method, examples_per_chunk, params, x, aux):
    """Compiled once per (predict, options, shapes); inlined when called under an outer ``jit``."""
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    n = _example_count(x)
    ids, names = groups_lib.group_ids(params, groups)
    gid = jax.tree_util.tree_leaves(ids)
    single = single_example_leaves(predict, treedef, x_def)
    k = int(np.prod(jax.eval_shape(single, p_leaves, [a[0] for a in x_leaves]).shape))
    r = k if num_cotangents is None else int(num_cotangents)

    def run(plan):
        floats = plan.floats_per_example(r) + r * sum(int(np.size(p_leaves[j])) for j in plan.direct) + r * k
        chunk = _resolve_chunk(examples_per_chunk, n, floats)
        return _map_examples(single, plan, p_leaves, x_leaves, aux, cotangent_fn, diag, gid, len(names), chunk)

    generic = ghost.generic_plan(len(p_leaves))
    plan = ghost.make_plan(single, p_leaves, x_leaves) if method == "fast" else generic
    if not plan.sites:
        return run(generic)
    try:
        return run(plan)
    except Exception as err:  # noqa: BLE001 - the tracer failed where its dry run did not
        result = run(generic)  # raises the generic path's own error, if it has one
        ghost.warn_fallback(f"{type(err).__name__}: {err}")
        return result


def _map_examples(single, plan, p_leaves, x_leaves, aux, cotangent_fn, diag, gid, num_groups, chunk):
    """``(grams [n, M, r(, r)], phi [n, k])`` over the examples, ``chunk`` at a time."""
    direct = plan.direct

    def one(args):
        xi, auxi = args

        def fwd(taps, direct_leaves):
            leaves = list(p_leaves)
            for j, v in zip(direct, direct_leaves):
                leaves[j] = v
            if not plan.sites:
                return single(leaves, xi), {}
            return plan.forward(leaves, xi, taps)

        phi, vjp_fn, caps = jax.vjp(fwd, plan.zero_taps(), [p_leaves[j] for j in direct], has_aux=True)
        if cotangent_fn is None:
            v = jnp.eye(phi.shape[0], dtype=phi.dtype)
        else:
            v = jnp.asarray(cotangent_fn(phi, auxi)).astype(phi.dtype)
        d_taps, d_direct = jax.vmap(vjp_fn)(v)
        shape = (num_groups, v.shape[0]) if diag else (num_groups, v.shape[0], v.shape[0])
        grams = jnp.zeros(shape, phi.dtype)
        for j, g in zip(direct, d_direct):
            grams = grams.at[gid[j]].add(ghost.gram_of_rows(g.reshape(g.shape[0], -1), diag))
        for leaf, gram in plan.site_grams(caps, d_taps, diag):
            grams = grams.at[gid[leaf]].add(gram.astype(phi.dtype))
        return grams, phi

    return jax.lax.map(one, (x_leaves, aux), batch_size=chunk)


def _finish(grams, names, by_group):
    if by_group:
        return {name: grams[:, g] for g, name in enumerate(names)}
    return jnp.sum(grams, axis=1)


def gram_blocks(predict, params, x, *, by_group=False, groups=None, method="fast", examples_per_chunk=None):
    """Per-example Jacobian Gram blocks G_i = J_i J_i^T, the diagonal blocks of the empirical NTK.

    Args:
      predict: ``predict(params, x) -> [n, k] or [n]``; examples must not interact.
      params: parameter pytree.
      x: inputs with leading example axis n (array or pytree).
      by_group: if True return ``{group name: [n, k, k]}`` with G_i^(g) = J_{i,g} J_{i,g}^T (they sum to G_i).
      groups: ``None`` (top-level modules), ``"leaf"`` or a callable on the leaf path; see :mod:`lsgeo.groups`.
      method: ``"fast"`` (ghost norms for dense kernels, per-example gradients for the rest) or ``"generic"``.
      examples_per_chunk: examples per chunk (``None``: automatic, ~256 MB of intermediates).

    Returns:
      ``[n, k, k]`` (or the dict). Cost: k backward passes of the one-example model per example
      (batched ``examples_per_chunk`` at a time). Memory: O(examples_per_chunk k (width sum)) on the fast path,
      O(examples_per_chunk k m) for leaves on the generic path.

    >>> import jax.numpy as jnp
    >>> predict = lambda p, x: x @ p["w"] + p["b"]
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> gram_blocks(predict, params, jnp.ones((4, 3)))[0].tolist()  # (||x_i||^2 + 1) I
    [[4.0, 0.0], [0.0, 4.0]]
    """
    grams, names, _ = per_example_grams(predict, params, x, groups=groups, method=method, examples_per_chunk=examples_per_chunk)
    return _finish(grams, names, by_group)


def sq_grad_norms(predict, params, x, cotangents, *, by_group=False, groups=None, method="fast", examples_per_chunk=None):
    """Per-example squared gradient norms ||J_i^T u_i||^2 for output cotangents u.

    For a mean loss L = 1/n sum_i l(phi_i, y_i) and u_i = dl/dphi_i this is the squared norm of the
    gradient of example i's loss (BackPACK's ``BatchL2Grad``, times n^2 relative to its mean-loss scaling).

    Args:
      predict, params, x: as in :func:`gram_blocks`.
      cotangents: ``[n, k]`` (one cotangent per example) or ``[n, k, r]`` (r per example); for scalar
        outputs ``[n]`` is accepted.
      by_group, groups, method, examples_per_chunk: as in :func:`gram_blocks`.

    Returns:
      ``[n]`` (or ``[n, r]``), or a dict of those per group. Cost: r backward passes per example.

    >>> import jax.numpy as jnp
    >>> predict = lambda p, x: x @ p["w"]
    >>> u = jnp.array([[1.0, 0.0], [3.0, 4.0]])
    >>> sq_grad_norms(predict, {"w": jnp.ones((3, 2))}, jnp.ones((2, 3)), u).tolist()  # ||x_i||^2 ||u_i||^2
    [3.0, 75.0]
    """
    cot = jnp.asarray(cotangents)
    n = _example_count(x)
    if cot.ndim == 0 or cot.shape[0] != n:
        raise ValueError(f"cotangents must have leading axis n = {n}, got shape {cot.shape}")
    if cot.ndim == 1:
        cot = cot[:, None]
    squeeze = cot.ndim == 2
    if squeeze:
        cot = cot[:, :, None]
    if cot.ndim != 3:
        raise ValueError(f"cotangents must have shape [n, k] or [n, k, r], got {cot.shape}")
    r = cot.shape[2]

    out_shape = jax.eval_shape(predict, params, x).shape
    k = out_shape[1] if len(out_shape) == 2 else 1
    if cot.shape[1] != k:
        raise ValueError(f"cotangents must have k = {k} outputs per example, got shape {cot.shape}")
    grams, names, _ = per_example_grams(
        predict, params, x, cotangent_fn=_transposed, aux=cot, num_cotangents=r, diag=True,
        groups=groups, method=method, examples_per_chunk=examples_per_chunk,
    )
    if squeeze:
        grams = grams[..., 0]
    return _finish(grams, names, by_group)


def _transposed(phi, u):
    return u.T


def fast_path_plan(predict, params, x) -> dict[str, str]:
    """Which route each parameter leaf takes in ``method="fast"``.

    ``"dense"``: ghost norm of a ``dot_general`` (no per-example gradient formed); ``"elementwise"``:
    a bias or scale (used once, elementwise through a broadcast), per-example gradient formed
    directly at the cost of the layer's width; ``"generic"``: per-example gradient formed directly
    (convolutions, shared weights, unknown primitives, or every leaf when the tracer cannot run, with
    a :class:`FastPathFallbackWarning`); ``"unused"``: the output does not depend on it.

    Returns:
      ``{"/".join(leaf path): route}``. Cost: one trace of ``predict``, no FLOPs.

    >>> import jax.numpy as jnp
    >>> predict = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
    >>> params = {"b": jnp.zeros(2), "v": jnp.ones(2), "w": jnp.ones((3, 2))}
    >>> fast_path_plan(predict, params, jnp.ones((4, 3)))
    {'b': 'elementwise', 'v': 'dense', 'w': 'dense'}
    """
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    _example_count(x)
    plan = ghost.make_plan(single_example_leaves(predict, treedef, x_def), p_leaves, x_leaves)
    return {"/".join(p): s for p, s in zip(groups_lib.leaf_paths(params), plan.status)}
