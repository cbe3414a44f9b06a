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

Two methods
-----------
``method="generic"``: for each example, ``vmap`` over the r cotangents of the VJP of the
one-example predictor gives the r per-example gradients J_i^T v_ic (r x m numbers), whose Gram
is formed and discarded. Examples are processed ``chunk_size`` at a time (``vmap`` inside a
``lax.map``). Always correct. Cost: r backward passes per example, r x m x chunk_size memory.

``method="fast"`` (default): the "ghost norm" trick of BackPACK / Goodfellow (2015) /
Li et al. (2022), applied automatically. ``predict`` is traced once to a jaxpr (nested ``jit``
calls are inlined) and every parameter leaf that is used exactly once, in

  * a ``dot_general`` z = a W (W possibly reshaped / transposed / cast; no batch dimensions), or
  * an elementwise ``add`` / ``sub`` / ``mul`` with a (broadcast) copy of the leaf (biases, scales),

is handled structurally: the jaxpr is re-evaluated with a zero "tap" t added to that equation's
output, the layer input a_i is captured on the way, and D_i = d phi_i / d t (r backward passes
w.r.t. the taps only; no per-example parameter gradient is formed). For a dense kernel with one
row per example, J_{i,W} J_{i,W}^T = ||a_i||^2 D_i D_i^T; with T > 1 rows per example (shared
weights over a sequence) the Gram is sum_{t,t'} <a_it, a_it'> <D_it, D_it'> (or the explicit
gradient, whichever is cheaper). Bias/scale leaves pull D_i back through their broadcast. Every
other leaf (convolution kernels, shared weights, leaves inside ``scan`` / ``remat`` / custom
derivatives) falls back to the generic path, in the same backward pass.
Cost: about r backward passes of the one-example model per example (batched), plus
O(k^2 d) per dense layer; memory chunk_size x r x (sum of layer widths) plus the fallback leaves.
:func:`fast_path_plan` reports which leaves take which route.

Reference: F. Dangel, F. Kunstner, P. Hennig, "BackPACK: Packing more into backprop", ICLR 2020;
I. Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from lsgeo import groups as groups_lib
from lsgeo.validation import check_choice, check_positive_int

__all__ = ["gram_blocks", "sq_grad_norms", "per_example_grams", "fast_path_plan", "METHODS"]

METHODS = ("fast", "generic")

# floats per chunk that the automatic chunk size aims for (~256 MB in float32)
_CHUNK_BUDGET = 2**26

_CALL_PRIMS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_ISO_PRIMS = frozenset(
    {"convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p", "neg"}
)
_BROADCAST_PRIMS = frozenset({"broadcast_in_dim"})
_ELT_PRIMS = frozenset({"add", "sub", "mul"})


# --------------------------------------------------------------------------------------------
# tracing the one-example predictor


def _example_count(x) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError("x must contain at least one array with a leading example axis")
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"x must have one leading example axis shared by all its leaves; got shapes "
                         f"{[np.shape(a) for a in leaves]}")
    return int(sizes.pop())


def _one_example_fn(predict, treedef, x_def):
    """phi_i(leaves, x_i leaves) -> [k], the predictor evaluated on one example."""

    def single(p_leaves, xi_leaves):
        p = jax.tree_util.tree_unflatten(treedef, list(p_leaves))
        xi = jax.tree_util.tree_unflatten(x_def, [a[None] for a in xi_leaves])
        out = predict(p, xi)
        if not hasattr(out, "ndim") or out.ndim not in (1, 2) or out.shape[0] != 1:
            raise ValueError(
                f"predict must return an array of shape [n, k] or [n]; on one example it returned "
                f"{getattr(out, 'shape', type(out))}"
            )
        return out.reshape(-1)

    return single


@dataclasses.dataclass(frozen=True)
class _Alias:
    """A jaxpr variable that is (an isometric / broadcast image of) parameter leaf ``leaf``."""

    leaf: int
    chain: tuple  # the equations leaf -> this variable
    iso: bool  # only isometric reshapes / transposes / casts in the chain


@dataclasses.dataclass(frozen=True)
class _Site:
    leaf: int
    kind: str  # "dot" or "elt"
    side: int  # operand index of the leaf
    eqn: Any
    chain: tuple
    path: tuple  # indices of the equation (through inlined calls)


def _analyze(jaxpr, in_infos, path, uses, top):
    env = {}
    for v, info in zip(jaxpr.invars, in_infos):
        env[v] = info

    def read(a):
        return None if isinstance(a, jex_core.Literal) else env.get(a)

    for idx, eqn in enumerate(jaxpr.eqns):
        p = path + (idx,)
        ins = [read(a) for a in eqn.invars]
        name = eqn.primitive.name
        if name in _CALL_PRIMS and isinstance(eqn.params.get("jaxpr"), jex_core.ClosedJaxpr):
            outs = _analyze(eqn.params["jaxpr"].jaxpr, ins, p, uses, False)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
            continue
        if all(i is None for i in ins):
            continue
        if (name in _ISO_PRIMS or name in _BROADCAST_PRIMS) and len(eqn.invars) == 1:
            a = ins[0]
            env[eqn.outvars[0]] = _Alias(a.leaf, a.chain + (eqn,), a.iso and name in _ISO_PRIMS)
            continue
        if name == "dot_general" or name in _ELT_PRIMS:
            for s in (0, 1):
                a = ins[s]
                if a is None:
                    continue
                other = ins[1 - s]
                same_leaf = other is not None and other.leaf == a.leaf
                if name == "dot_general":
                    (_, _), (lb, rb) = eqn.params["dimension_numbers"]
                    ok = a.iso and not lb and not rb and not same_leaf
                    kind = "dot"
                else:
                    ok = (not same_leaf) and _broadcastable(eqn.invars[s].aval.shape, eqn.outvars[0].aval.shape)
                    kind = "elt"
                uses[a.leaf].append(_Site(a.leaf, kind, s, eqn, a.chain, p) if ok else None)
            continue
        for a in ins:
            if a is not None:
                uses[a.leaf].append(None)  # opaque use
    outs = [read(a) for a in jaxpr.outvars]
    if top:
        for a in outs:
            if a is not None:
                uses[a.leaf].append(None)
    return outs


def _broadcastable(shape, out_shape) -> bool:
    """Whether an elementwise operand of ``shape`` broadcasts (rank-0 or size-1 dims) to ``out_shape``."""
    if len(shape) == 0:
        return True
    return len(shape) == len(out_shape) and all(s == o or s == 1 for s, o in zip(shape, out_shape))


def _unbroadcast(d, shape):
    """Sums cotangents ``d`` [r, *out_shape] down to an operand of ``shape`` (adjoint of broadcasting)."""
    if len(shape) == 0:
        return jnp.sum(d, axis=tuple(range(1, d.ndim)))
    axes = tuple(i + 1 for i, (s, o) in enumerate(zip(shape, d.shape[1:])) if s == 1 and o != 1)
    return jnp.sum(d, axis=axes, keepdims=True) if axes else d


@dataclasses.dataclass
class _Plan:
    closed: Any  # ClosedJaxpr of the one-example predictor (None for the generic method)
    sites: dict  # path -> list[_Site]
    fallback: list  # leaf indices on the generic path
    status: list  # per leaf: "dense" | "elementwise" | "unused" | "generic"
    prefixes: frozenset  # paths of call equations that contain a site


def _make_plan(single, leaves, x_leaves, method) -> _Plan:
    num = len(leaves)
    if method == "generic":
        return _Plan(None, {}, list(range(num)), ["generic"] * num, frozenset())
    specs = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves]
    xspecs = [jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)) for a in x_leaves]
    closed = jax.make_jaxpr(single)(specs, xspecs)
    jaxpr = closed.jaxpr
    uses = {j: [] for j in range(num)}
    in_infos = [_Alias(j, (), True) for j in range(num)] + [None] * len(x_leaves)
    _analyze(jaxpr, in_infos, (), uses, True)
    # sites are keyed by their path of equation indices (an inner jaxpr shared by two calls of one
    # jitted helper holds the same equation objects at two paths)
    sites: dict = {}
    status, fallback = [], []
    for j in range(num):
        u = uses[j]
        if not u:
            status.append("unused")
        elif len(u) == 1 and u[0] is not None:
            status.append("dense" if u[0].kind == "dot" else "elementwise")
            sites.setdefault(u[0].path, []).append(u[0])
        else:
            status.append("generic")
            fallback.append(j)
    prefixes = frozenset(p[:i] for p in sites for i in range(1, len(p)))
    return _Plan(closed, sites, fallback, status, prefixes)


def _eval_tapped(jaxpr, consts, args, path, plan, taps, caps):
    """Evaluates ``jaxpr`` adding ``taps[p]`` to the output of every site equation p and recording the
    operands the Gram formulas need in ``caps``. Calls containing sites are inlined."""
    env = {}

    def read(a):
        return a.val if isinstance(a, jex_core.Literal) else env[a]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for idx, eqn in enumerate(jaxpr.eqns):
        p = path + (idx,)
        invals = [read(a) for a in eqn.invars]
        if p in plan.prefixes:
            cj = eqn.params["jaxpr"]
            ans = _eval_tapped(cj.jaxpr, cj.consts, invals, p, plan, taps, caps)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **bind_params)
        if p in plan.sites:
            site = plan.sites[p][0]
            if site.kind == "dot" or eqn.primitive.name == "mul":
                caps[p] = tuple(invals[1 - s.side] for s in plan.sites[p])
            ans = ans + taps[p]
        if eqn.primitive.multiple_results:
            for v, val in zip(eqn.outvars, ans):
                env[v] = val
        else:
            env[eqn.outvars[0]] = ans
    return [read(a) for a in jaxpr.outvars]


# --------------------------------------------------------------------------------------------
# Gram formulas


def _gram_of_rows(g, diag):
    """g: [r, p] per-example gradients (one row per cotangent) -> [r] squared norms or [r, r] Gram."""
    if diag:
        return jnp.sum(jnp.square(g), axis=-1)
    return g @ g.T


def _dot_gram(a, d, site, diag):
    """Gram of the per-example gradient of a kernel used as out = dot_general(a, W) (either side).

    a: the other operand (one example), d: [r, *out_shape] cotangents of the equation's output.
    """
    eqn = site.eqn
    (lc, rc), _ = eqn.params["dimension_numbers"]
    a_is_lhs = site.side == 1
    ca = tuple(lc if a_is_lhs else rc)
    fa = tuple(i for i in range(a.ndim) if i not in ca)
    r = d.shape[0]
    t = int(np.prod([a.shape[i] for i in fa], dtype=np.int64))
    c = int(np.prod([a.shape[i] for i in ca], dtype=np.int64))
    am = jnp.transpose(a, fa + ca).reshape(t, c)
    f = int(np.prod(d.shape[1:], dtype=np.int64)) // t
    if a_is_lhs:
        dm = d.reshape(r, t, f)
    else:
        dm = jnp.swapaxes(d.reshape(r, f, t), 1, 2)
    am = am.astype(dm.dtype)
    if t == 1:
        a2 = jnp.sum(jnp.square(am))
        return a2 * _gram_of_rows(dm[:, 0, :], diag)
    ghost = t * t * c + (r if diag else r * r) * t * t * f
    direct = r * t * c * f + (1 if diag else r) * r * c * f
    if ghost <= direct:
        aa = am @ am.T
        if diag:
            return jnp.einsum("tu,ctf,cuf->c", aa, dm, dm)
        return jnp.einsum("tu,ctf,duf->cd", aa, dm, dm)
    g = jnp.einsum("tC,ctf->cCf", am, dm).reshape(r, -1)
    return _gram_of_rows(g, diag)


def _elt_gram(leaf_value, other, d, site, diag):
    """Gram of the per-example gradient of a leaf entering ``add/sub/mul`` through a broadcast chain."""
    if site.eqn.primitive.name == "mul":
        d = d * other
    d = _unbroadcast(d, site.eqn.invars[site.side].aval.shape)
    chain = site.chain

    def forward(w):
        for eqn in chain:
            w = eqn.primitive.bind(w, **eqn.primitive.get_bind_params(eqn.params))
        return w

    if chain:
        spec = jax.ShapeDtypeStruct(np.shape(leaf_value), jnp.result_type(leaf_value))
        transpose = jax.linear_transpose(forward, spec)
        out_dtype = site.eqn.invars[site.side].aval.dtype
        g = jax.vmap(lambda di: transpose(di.astype(out_dtype))[0])(d)
    else:
        g = d
    return _gram_of_rows(g.reshape(d.shape[0], -1), diag)


# --------------------------------------------------------------------------------------------
# the engine


def _resolve_chunk(chunk_size, n, per_example_floats):
    if chunk_size is None:
        return int(max(1, min(n, _CHUNK_BUDGET // max(1, per_example_floats))))
    check_positive_int(chunk_size, "chunk_size")
    return int(min(chunk_size, n))


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
    chunk_size: int | None = None,
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
      chunk_size: examples per chunk; ``None`` picks one for ~256 MB of float32 intermediates.

    Returns:
      ``(grams, names, outputs)``: grams ``[n, M, r, r]`` (``[n, M, r]`` if ``diag``) for the M groups
      ``names``, and the predictions ``[n, k]`` (as a matrix).
    """
    check_choice(method, "method", METHODS)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    _example_count(x)
    _, names = groups_lib.group_ids(params, groups)
    grams, phi = _grams_jit(predict, cotangent_fn, num_cotangents, diag, groups, method, chunk_size, params, x, aux)
    return grams, names, phi


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _grams_jit(predict, cotangent_fn, num_cotangents, diag, groups, method, chunk_size, params, x, aux):
    """Compiled once per (predict, options, shapes); inlined when called under an outer ``jit``."""
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    n = _example_count(x)
    ids, names = groups_lib.group_ids(params, groups)
    gid = jax.tree_util.tree_leaves(ids)
    num_groups = len(names)
    single = _one_example_fn(predict, treedef, x_def)
    plan = _make_plan(single, p_leaves, x_leaves, method)
    k = int(np.prod(jax.eval_shape(single, p_leaves, [a[0] for a in x_leaves]).shape))
    r = k if num_cotangents is None else int(num_cotangents)

    site_floats = 0
    if plan.closed is not None:
        for p, ss in plan.sites.items():
            out_size = int(np.prod(ss[0].eqn.outvars[0].aval.shape))
            site_floats += r * out_size + sum(int(np.prod(v.aval.shape)) for v in ss[0].eqn.invars)
    fb_floats = r * sum(int(np.size(p_leaves[j])) for j in plan.fallback)
    chunk = _resolve_chunk(chunk_size, n, site_floats + fb_floats + r * k)

    def one(args):
        xi, auxi = args

        def fwd(taps, fb):
            leaves = list(p_leaves)
            for j, v in zip(plan.fallback, fb):
                leaves[j] = v
            if plan.closed is None:
                return single(leaves, xi), {}
            caps: dict = {}
            (out,) = _eval_tapped(plan.closed.jaxpr, plan.closed.consts, list(leaves) + list(xi), (), plan, taps, caps)
            return out.reshape(-1), caps

        taps0 = {}
        if plan.closed is not None:
            taps0 = {p: jnp.zeros(ss[0].eqn.outvars[0].aval.shape, ss[0].eqn.outvars[0].aval.dtype)
                     for p, ss in plan.sites.items()}
        fb0 = [p_leaves[j] for j in plan.fallback]
        phi, vjp_fn, caps = jax.vjp(fwd, taps0, fb0, has_aux=True)
        if cotangent_fn is None:
            v = jnp.eye(phi.shape[0], dtype=phi.dtype)
        else:
            v = jnp.asarray(cotangent_fn(phi, auxi)).astype(phi.dtype)
        d_taps, d_fb = jax.vmap(vjp_fn)(v)
        shape = (num_groups, v.shape[0]) if diag else (num_groups, v.shape[0], v.shape[0])
        grams = jnp.zeros(shape, phi.dtype)
        for j, g in zip(plan.fallback, d_fb):
            grams = grams.at[gid[j]].add(_gram_of_rows(g.reshape(g.shape[0], -1), diag))
        for p, ss in plan.sites.items():
            for s_idx, site in enumerate(ss):
                if site.kind == "dot":
                    gram = _dot_gram(caps[p][s_idx], d_taps[p], site, diag)
                else:
                    other = caps[p][s_idx] if p in caps else None
                    gram = _elt_gram(p_leaves[site.leaf], other, d_taps[p], site, diag)
                grams = grams.at[gid[site.leaf]].add(gram.astype(phi.dtype))
        return grams, phi

    return jax.lax.map(one, (x_leaves, aux), batch_size=chunk)


def _finish(grams, names, by_group):
    if by_group:
        return {name: grams[:, g] for g, name in enumerate(names)}
    return jnp.sum(grams, axis=1)


def gram_blocks(predict, params, x, *, by_group=False, groups=None, method="fast", chunk_size=None):
    """Per-example Jacobian Gram blocks G_i = J_i J_i^T, the diagonal blocks of the empirical NTK.

    Args:
      predict: ``predict(params, x) -> [n, k] or [n]``; examples must not interact.
      params: parameter pytree.
      x: inputs with leading example axis n (array or pytree).
      by_group: if True return ``{group name: [n, k, k]}`` with G_i^(g) = J_{i,g} J_{i,g}^T (they sum to G_i).
      groups: ``None`` (top-level modules), ``"leaf"`` or a callable on the leaf path; see :mod:`lsgeo.groups`.
      method: ``"fast"`` (structured ghost-norm path with generic fallback) or ``"generic"``.
      chunk_size: examples per chunk (``None``: automatic, ~256 MB of intermediates).

    Returns:
      ``[n, k, k]`` (or the dict). Cost: k backward passes of the one-example model per example
      (batched ``chunk_size`` at a time). Memory: O(chunk_size k (width sum)) on the fast path,
      O(chunk_size k m) for leaves on the generic path.
    """
    grams, names, _ = per_example_grams(predict, params, x, groups=groups, method=method, chunk_size=chunk_size)
    return _finish(grams, names, by_group)


def sq_grad_norms(predict, params, x, cotangents, *, by_group=False, groups=None, method="fast", chunk_size=None):
    """Per-example squared gradient norms ||J_i^T u_i||^2 for output cotangents u.

    For a mean loss L = 1/n sum_i l(phi_i, y_i) and u_i = dl/dphi_i this is the squared norm of the
    gradient of example i's loss (BackPACK's ``BatchL2Grad``, times n^2 relative to its mean-loss scaling).

    Args:
      predict, params, x: as in :func:`gram_blocks`.
      cotangents: ``[n, k]`` (one cotangent per example) or ``[n, k, r]`` (r per example); for scalar
        outputs ``[n]`` is accepted.
      by_group, groups, method, chunk_size: as in :func:`gram_blocks`.

    Returns:
      ``[n]`` (or ``[n, r]``), or a dict of those per group. Cost: r backward passes per example.
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
        raise ValueError(f"cotangents must have shape [n, k] or [n, k, r], got {cotangents.shape}")
    r = cot.shape[2]

    out_shape = jax.eval_shape(predict, params, x).shape
    k = out_shape[1] if len(out_shape) == 2 else 1
    if cot.shape[1] != k:
        raise ValueError(f"cotangents must have k = {k} outputs per example, got shape {cot.shape}")
    grams, names, _ = per_example_grams(
        predict, params, x, cotangent_fn=_transposed, aux=cot, num_cotangents=r, diag=True,
        groups=groups, method=method, chunk_size=chunk_size,
    )
    if squeeze:
        grams = grams[..., 0]
    return _finish(grams, names, by_group)


def _transposed(phi, u):
    return u.T


def fast_path_plan(predict, params, x) -> dict[str, str]:
    """Which route each parameter leaf takes in ``method="fast"``: ``"dense"`` (ghost norm of a
    ``dot_general``), ``"elementwise"`` (bias / scale), ``"unused"`` or ``"generic"`` (fallback).
    Keys are ``"/".join(leaf path)``. Cost: one trace of ``predict``, no FLOPs."""
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    _example_count(x)
    plan = _make_plan(_one_example_fn(predict, treedef, x_def), p_leaves, x_leaves, "fast")
    return {"/".join(p): s for p, s in zip(groups_lib.leaf_paths(params), plan.status)}
