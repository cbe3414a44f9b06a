"""Influence scores from the factors of dense layers: the training gradients of dense kernels are never formed.

Math. A dense kernel W used once as ``z_t = a_t W`` (rows t = 1..T of one example: T = 1 in an MLP, the positions
of a sequence otherwise) has the loss gradient ``G_i = sum_t a_it^T delta_it`` for example i (``a``: the layer's
input, ``delta = dl_i / dz``; Goodfellow 2015). A query whose preconditioned gradient on W is a sum of r outer
products ``P_q = sum_k u_qk v_qk^T`` scores

    <P_q, G_i> = sum_{t, k} (a_it . u_qk) (delta_it . v_qk),

Q r T (c + f) multiply-adds per training example for a c x f kernel instead of the Q c f of the dense contraction
(at Q = 128 on a 784 x 512 layer: 166 k against 51 M). ``P_q`` has that form

- exactly for ``inverse="identity"``: ``P_q = g_q`` has the rows of the query itself (u = a_q, v = delta_q,
  r = T_q): gradient dot products at the cost of a backward pass (the "ghost dot product" of TracIn-style
  attribution);
- approximately with ``query_rank=r`` for any inverse: the best rank-r approximation of ``(A + d I)^-1 g_q`` on
  each kernel (Kronfluence's low-rank query gradients, Grosse et al. 2023 Sec. 3.2), by a randomized SVD
  (Halko et al. 2011: r + 10 Gaussian test vectors, two power iterations; the exact truncation where that is not
  smaller), the rank-r part of the scores. Exact when r >= the rank of every ``P_q``.

A query kept whole (no ``query_rank``, or where ``r T (c + f) >= c f``: long sequences, small layers) is the dense
``[Q, c, f]`` matrix: for T = 1 the scores ``a_i P_q delta_i^T`` of a chunk of examples are one GEMM
``[chunk, c] x [c, Q f]`` (the c x f gradient is never formed; the same 2 Q c f flops as the dense contraction, with
none of its memory traffic), for T > 1 ``G_i`` is formed (T c f) and contracted. Every other leaf (biases, scales, convolutions, shared weights: the ``"elementwise"`` and
``"generic"`` routes of :mod:`lsgeo.per_example.ghost`) has its per-example gradient formed by the backward pass and
contracted with its dense preconditioned query.

Cost per training example: one forward and backward pass of the one-example model (batched) plus, per dense
kernel, ``Q r T (c + f)``; per query: the inverse product, and the SVD of each kernel's ``c x f`` matrix
(randomized: ``O(c f (r + 10))``). Memory: ``examples_per_chunk`` x (layer widths + direct gradients) + the query
factors ``Q r (c + f)`` per kernel.

References: I. Goodfellow, Efficient per-example gradient computations, arXiv:1510.01799; R. Grosse et al.,
Studying large language model generalization with influence functions, 2023; N. Halko, P.-G. Martinsson,
J. A. Tropp, Finding structure with randomness, SIAM Review 2011.

Example (through :func:`lsgeo.influence.pairwise_scores`, which takes this route for ``"identity"``):
  >>> import jax.numpy as jnp
  >>> from lsgeo import influence, losses
  >>> predict = lambda p, x: x @ p["w"]
  >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([[1.0], [1.0]])
  >>> influence.pairwise_scores(predict, losses.squared_loss, {"w": jnp.zeros((2, 1))}, (x, y), (x, y),
  ...                           inverse="identity")
  array([[1., 0.],
         [0., 4.]], dtype=float32)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.per_example import ghost, single_example_leaves

__all__ = ["plan_for", "query_factors", "lowrank_query_factors", "block_scores", "self_block_scores", "OVERSAMPLE",
           "POWER_ITERATIONS"]

#: extra Gaussian test vectors of the randomized SVD (Halko et al. 2011, Sec. 4.2)
OVERSAMPLE = 10
#: power iterations of the randomized SVD (torch.svd_lowrank's default, Kronfluence's)
POWER_ITERATIONS = 2


def _traced(predict, params, x):
    """``(plan, parameter leaves, input leaves, the one-example output shape)`` for the compiled functions below."""
    p_leaves = jax.tree_util.tree_leaves(params)
    return plan_for(predict, params, x), p_leaves, jax.tree_util.tree_leaves(x), _out_shape_of(predict, params, x)


def plan_for(predict, params, x) -> ghost.Plan:
    """The ghost plan of ``predict`` (which leaves are dense kernels); no FLOPs, one trace per (predict, shapes),
    cached. Its ``sites`` are empty when no leaf is a dense kernel (then nothing is gained over the dense
    contraction)."""
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))  # noqa: E731
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    example = lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]), jnp.result_type(a))  # noqa: E731
    return _cached_plan(predict, treedef, tuple(map(spec, p_leaves)), x_def, tuple(map(example, x_leaves)))


@functools.lru_cache(maxsize=32)
def _cached_plan(predict, treedef, p_specs, x_def, x_specs):
    return ghost.make_plan(single_example_leaves(predict, treedef, x_def), list(p_specs), list(x_specs))


def _example_factors(plan, loss, p_leaves, out_shape, xi, yi):
    """``({path: ((a_m [T, c], delta_m [T, f]) per site)}, (gradient of each direct leaf))`` of one example's loss."""
    direct = plan.direct

    def forward(taps, direct_leaves):
        leaves = list(p_leaves)
        for j, v in zip(direct, direct_leaves):
            leaves[j] = v
        phi, caps = plan.forward(leaves, xi, taps)
        y1 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], yi)
        value = loss(phi.reshape(out_shape), y1)
        if jnp.ndim(value) != 0:
            raise ValueError(f"loss must return a scalar (the mean over examples), got shape {jnp.shape(value)}")
        return value, caps

    value, vjp_fn, caps = jax.vjp(forward, plan.zero_taps(), [p_leaves[j] for j in direct], has_aux=True)
    d_taps, d_direct = vjp_fn(jnp.ones_like(value))
    sites = {}
    for p, ss in plan.sites.items():
        pairs = []
        for i, site in enumerate(ss):
            am, dm = ghost.site_factors(caps[p][i], d_taps[p][None], site)
            pairs.append((am, dm[0]))
        sites[p] = tuple(pairs)
    return sites, tuple(d_direct)


def _chunk(chunk, leaves) -> int:
    n = leaves[0].shape[0]
    return n if chunk is None else min(int(chunk), n)


def _factored_is_cheaper(rank: int, t: int, c: int, f: int) -> bool:
    return rank * t * (c + f) < c * f


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def query_factors(predict, loss, chunk, params, x, y):
    """The exact factors of the query gradients g_q (for ``inverse="identity"``): ``(sites, direct)`` with
    ``sites[path][i]`` either ``(u [Q, T, c], v [Q, T, f])`` (rows of the query, ``g_q = sum_t u_t^T v_t``) or
    ``(m [Q, c, f],)`` where the dense form is cheaper, and ``direct[j]`` the gradient of direct leaf j ``[Q, ...]``."""
    plan, p_leaves, x_leaves, out_shape = _traced(predict, params, x)
    one = functools.partial(_example_factors, plan, loss, p_leaves, out_shape)
    sites, direct = jax.lax.map(lambda ex: one(ex[0], ex[1]), (x_leaves, y), batch_size=_chunk(chunk, x_leaves))
    out = {}
    for p, pairs in sites.items():
        terms = []
        for am, dm in pairs:
            _, t, c = am.shape
            f = dm.shape[-1]
            terms.append((am, dm) if _factored_is_cheaper(t, t, c, f) else (jnp.einsum("qtc,qtf->qcf", am, dm),))
        out[p] = tuple(terms)
    return out, direct


def _out_shape_of(predict, params, x):
    x1 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]), jnp.result_type(a)), x)
    return tuple(jax.eval_shape(predict, params, x1).shape)


def _orthonormal(y):
    """Orthonormal columns spanning the range of ``y`` (Gram eigendecomposition, twice, as CholeskyQR2; directions
    whose squared singular value is below ``eps`` x the largest are zeroed, so a rank-deficient ``y`` is fine: what
    is lost is below ``sqrt(eps)`` of the largest singular value). Several times faster than
    ``jnp.linalg.qr`` on XLA:CPU for the tall, thin matrices of the range finder."""
    for _ in range(2):
        w, v = jnp.linalg.eigh(y.T @ y)
        keep = w > w[-1] * jnp.finfo(y.dtype).eps
        y = (y @ v) * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1)), 0)
    return y


def _top_directions(gram, rank: int):
    """The eigenvectors of the ``rank`` largest eigenvalues of a symmetric PSD ``gram`` (columns)."""
    return jnp.linalg.eigh(gram)[1][:, ::-1][:, :rank]


def _truncated_svd(m, rank: int, key):
    """``(u [rank, c], v [rank, f])`` with ``sum_k u_k v_k^T`` the rank-``rank`` truncated SVD of ``m [c, f]``:
    exact (the top eigenvectors of ``m m^T`` or ``m^T m``) when ``rank + OVERSAMPLE >= min(c, f)``, else randomized
    (Halko et al. 2011, Alg. 4.4: a Gaussian sketch of width ``rank + OVERSAMPLE``, ``POWER_ITERATIONS`` power
    iterations, then the exact truncation of ``m`` projected on that range). Only symmetric eigendecompositions of
    small Gram matrices: XLA:CPU's SVD and QR of these shapes are 10-100x slower."""
    c, f = m.shape
    width = rank + OVERSAMPLE
    if width >= min(c, f):
        if c <= f:
            u = _top_directions(m @ m.T, rank)
            return u.T, (m.T @ u).T
        v = _top_directions(m.T @ m, rank)
        return (m @ v).T, v.T
    basis = _orthonormal(m @ jax.random.normal(key, (f, width), m.dtype))
    for _ in range(POWER_ITERATIONS):  # orthonormalised after every product (Alg. 4.4), never after m m^T
        basis = _orthonormal(m @ _orthonormal(m.T @ basis))
    b = basis.T @ m
    u = _top_directions(b @ b.T, rank)
    return (basis @ u).T, (b.T @ u).T


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def lowrank_query_factors(predict, rank, chunk, params, x, preconditioned, key):
    """Rank-``rank`` factors of the preconditioned query gradients (a pytree like ``params`` with a leading Q axis):
    ``(sites, direct)`` as :func:`query_factors`, each dense kernel's ``[c, f]`` matrix replaced by its truncated SVD
    (or kept dense where that is cheaper, and always with ``rank=None``: exact), the direct leaves kept whole."""
    plan = plan_for(predict, params, x)
    q_leaves = jax.tree_util.tree_leaves(preconditioned)
    out = {}
    for p, ss in plan.sites.items():
        terms = []
        for site in ss:
            mats = jax.vmap(functools.partial(ghost.site_matrix, site))(q_leaves[site.leaf])
            _, c, f = mats.shape
            t = int(np.prod(site.out_shape, dtype=np.int64)) // f
            if rank is not None and _factored_is_cheaper(rank, t, c, f):
                terms.append(jax.lax.map(lambda m: _truncated_svd(m, rank, key), mats))  # one at a time: LAPACK is not batched
            else:
                terms.append((mats,))
        out[p] = tuple(terms)
    return out, tuple(q_leaves[j] for j in plan.direct)


def _site_scores(am, dm, term):
    """``[Q]``: ``<P_q, a_m^T delta_m>`` for the query term of one site."""
    if len(term) == 2:
        u, v = term
        return jnp.sum(jnp.einsum("tc,qkc->qtk", am, u.astype(am.dtype)) * jnp.einsum("tf,qkf->qtk", dm, v.astype(dm.dtype)),
                       axis=(1, 2))
    (m,) = term
    if am.shape[0] == 1:  # a_m P_q delta_m^T: one GEMM over the chunk, the c x f gradient never formed
        return jnp.einsum("c,qcf,f->q", am[0], m, dm[0].astype(m.dtype))
    g = am.T @ dm  # T > 1: forming the gradient (T c f) beats T contractions with every query (T Q c f)
    return m.reshape(m.shape[0], -1) @ g.reshape(-1).astype(m.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def block_scores(predict, loss, chunk, leaf_ids, num_groups, params, queries, x, y):
    """``[b, M, Q]``: the scores of a block of training examples against the query factors, per group."""
    plan, p_leaves, x_leaves, out_shape = _traced(predict, params, x)
    q_sites, q_direct = queries
    if set(q_sites) != set(plan.sites) or len(q_direct) != len(plan.direct):
        raise ValueError("the query factors were built for another model (the dense kernels differ)")
    num_queries = (jax.tree_util.tree_leaves(queries)[0]).shape[0]
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(queries))

    def one(ex):
        sites, direct = _example_factors(plan, loss, p_leaves, out_shape, ex[0], ex[1])
        out = jnp.zeros((num_groups, num_queries), dtype)
        for p, ss in plan.sites.items():
            for site, (am, dm), term in zip(ss, sites[p], q_sites[p]):
                out = out.at[leaf_ids[site.leaf]].add(_site_scores(am, dm, term).astype(dtype))
        for j, g, q in zip(plan.direct, direct, q_direct):
            out = out.at[leaf_ids[j]].add(q.reshape(num_queries, -1) @ g.reshape(-1).astype(dtype))
        return out

    return jax.lax.map(one, (x_leaves, y), batch_size=_chunk(chunk, x_leaves))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def self_block_scores(predict, loss, chunk, leaf_ids, num_groups, params, x, y):
    """``[b, M]``: the squared gradient norms ``||g_i||^2`` of a block of examples per group (self-influence with
    ``inverse="identity"``), dense kernels by the ghost norm ``sum_{t,t'} (a_t . a_t') (delta_t . delta_t')``."""
    plan, p_leaves, x_leaves, out_shape = _traced(predict, params, x)
    dtype = jnp.promote_types(jnp.result_type(*p_leaves), jnp.float32)

    def one(ex):
        sites, direct = _example_factors(plan, loss, p_leaves, out_shape, ex[0], ex[1])
        out = jnp.zeros((num_groups,), dtype)
        for p, ss in plan.sites.items():
            for site, (am, dm) in zip(ss, sites[p]):
                out = out.at[leaf_ids[site.leaf]].add(jnp.sum((am @ am.T) * (dm @ dm.T)).astype(dtype))
        for j, g in zip(plan.direct, direct):
            out = out.at[leaf_ids[j]].add(jnp.sum(jnp.square(g)).astype(dtype))
        return out

    return jax.lax.map(one, (x_leaves, y), batch_size=_chunk(chunk, x_leaves))
