"""The ghost-norm tracer behind ``method="fast"``: the only code in lsgeo that reads jaxprs.

Math. For a dense layer z_i = a_i W of example i (a_i in R^{T x c}: T rows, T = 1 for an MLP, T > 1
for weights shared over a sequence) and D_i = d phi_i / d z_i in R^{r x T x f} for r output
cotangents, the per-example gradient of W for cotangent c is a_i^T D_ic, so

  <J_{i,W}^T v_c, J_{i,W}^T v_d> = sum_{t,t'} <a_it, a_it'> <D_ict, D_idt'>   (= ||a_i||^2 <D_ic, D_id> if T = 1)

which needs a_i (captured on the forward pass) and D_i (the cotangent of a zero "tap" added to z_i),
never the r x c x f per-example gradient (Goodfellow 2015; BackPACK, Dangel et al. 2020). For T > 1
the cheaper of this form (T^2 c + r^2 T^2 f flops) and the explicit gradient (r T c f) is taken.

How. The one-example predictor is traced once with :func:`jax.make_jaxpr`. A parameter leaf is
``"dense"`` when it is used exactly once, as an operand of a ``dot_general`` without batch dimensions,
possibly through reshapes, transposes, casts or a negation (isometries: they leave the Gram
unchanged), at any depth of ``jit`` calls. A leaf used once in an elementwise ``add``, ``sub`` or
``mul`` through a broadcast (a bias, a scale) is ``"elementwise"``: its per-example gradient is no
larger than the layer's output and is formed directly by the backward pass. Every other leaf
(convolutions, weights used twice, leaves entering ``scan``, ``remat``, custom derivatives or any
primitive not named below) is ``"generic"``: its per-example gradient is formed directly too, at a
cost of its size per cotangent. The tapped predictor is evaluated by JAX's own jaxpr evaluator: the
runs of equations between two dense sites become sub-jaxprs run by ``jaxpr_as_fun``; a call that
contains a site is entered; a site equation is run the same way, then its tap is added and its other
operand captured. Cost of a plan: one trace of the predictor and one abstract dry run, no FLOPs;
of the evaluation: see :mod:`lsgeo.per_example.grams`.

Fallback contract (no wrong number, no new crash). An unknown primitive or call, or an equation
whose parameters do not have the layout read here, makes the leaves it touches ``"generic"`` (per
leaf). Any exception while analysing the jaxpr, or during a dry run of the tapped evaluation, its
backward pass and the Gram formulas on abstract values (:func:`jax.eval_shape`, no FLOPs, once per
plan), makes every leaf generic and emits a :class:`FastPathFallbackWarning`; so does any exception
when :func:`lsgeo.per_example.per_example_grams` traces the plan for real (it then reruns the
generic path, whose own error, if any, is the one raised). The generic path computes the same
numbers; tests/test_per_example_ghost.py fails when the fast path stops being taken.

JAX surface used, each looked up with ``getattr``, nothing from ``jax._src`` (a missing primitive makes
the leaves that need it generic; a missing ``dot_general_p``, ``Jaxpr``, ``ClosedJaxpr``, ``Literal`` or
evaluator turns the fast path off, with the warning above):
  * public API: ``jax.make_jaxpr``, ``jax.eval_shape``, ``jax.vjp``;
  * ``jax.extend.core``: ``jaxpr_as_fun`` (else ``jax.core.eval_jaxpr``),
    ``Jaxpr(constvars, invars, outvars, eqns, effects)``, ``ClosedJaxpr`` (``.jaxpr``, ``.consts``),
    ``Literal`` (``.val``), ``DropVar``;
  * ``jax.extend.core.primitives``, matched by identity (a renamed primitive keeps its object):
    ``dot_general_p``, ``add_p``, ``sub_p``, ``mul_p``, ``broadcast_in_dim_p``, ``reshape_p``,
    ``transpose_p``, ``squeeze_p``, ``convert_element_type_p``, ``copy_p``, ``neg_p`` and the calls
    ``jit_p`` (``pjit_p`` in older JAX) and ``closed_call_p``;
  * the fields of a jaxpr: ``Jaxpr.constvars/invars/outvars/eqns``,
    ``JaxprEqn.primitive/invars/outvars/params/effects``, ``Var.aval.shape/dtype``;
  * equation parameters: ``dot_general``'s ``dimension_numbers = ((lhs_contract, rhs_contract),
    (lhs_batch, rhs_batch))`` and a call's body ``jaxpr`` / ``call_jaxpr`` (a ``ClosedJaxpr``).

Reference: I. Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799;
F. Dangel, F. Kunstner, P. Hennig, "BackPACK: Packing more into backprop", ICLR 2020.

>>> import jax.numpy as jnp
>>> from lsgeo.per_example import ghost
>>> single = lambda leaves, xi: jnp.tanh(xi[0] @ leaves[0]) + leaves[1]
>>> leaves = [jnp.ones((3, 2)), jnp.zeros(2)]
>>> ghost.make_plan(single, leaves, [jnp.ones((5, 3))]).status
('dense', 'elementwise')
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import jaxpr_interpreter as interp

__all__ = ["FastPathFallbackWarning", "Plan", "generic_plan", "make_plan", "site_factors", "site_matrix"]


class FastPathFallbackWarning(RuntimeWarning):
    """The ghost-norm tracer could not run on this JAX or this model: the generic path was used."""


_DOT = interp.primitives("dot_general_p")
_ELEMENTWISE = interp.primitives("add_p", "sub_p", "mul_p")
_ISOMETRIES = interp.primitives("reshape_p", "transpose_p", "squeeze_p", "convert_element_type_p", "copy_p", "neg_p")
_VIEWS = _ISOMETRIES + interp.primitives("broadcast_in_dim_p")


def _missing_surface() -> str | None:
    """The name of a missing piece of the JAX surface this module needs, or None."""
    return "primitives.dot_general_p" if not _DOT else interp.missing_surface()


def _dimension_numbers(eqn):
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`` as int tuples, None if unreadable."""
    try:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        return (tuple(map(int, lc)), tuple(map(int, rc))), (tuple(map(int, lb)), tuple(map(int, rb)))
    except (KeyError, TypeError, ValueError):
        return None


def _broadcastable(shape, out_shape) -> bool:
    """Whether an elementwise operand of ``shape`` broadcasts (rank 0 or size-1 dims) to ``out_shape``."""
    if len(shape) == 0:
        return True
    return len(shape) == len(out_shape) and all(s == o or s == 1 for s, o in zip(shape, out_shape))


@dataclasses.dataclass(frozen=True)
class _Alias:
    """A jaxpr variable that is a view (reshape, broadcast, cast, ...) of parameter leaf ``leaf``."""

    leaf: int
    iso: bool  # only isometries between the leaf and this variable
    chain: tuple = dataclasses.field(default=(), compare=False)  # the view equations from the leaf to it


@dataclasses.dataclass(frozen=True)
class _Site:
    """A dense kernel: leaf ``leaf`` is operand ``side`` of the dot_general at ``path``."""

    leaf: int
    side: int
    contract: tuple  # contracting dimensions of the other operand
    out_shape: tuple
    out_dtype: Any
    operand_size: int  # floats of the captured operand
    chain: tuple = dataclasses.field(default=(), compare=False)  # view equations from the leaf to the operand
    leaf_contract: tuple = ()  # contracting dimensions of the leaf's operand, paired with ``contract``


def _dense_site(eqn, s, ins, path, leaf_alias):
    """The _Site for leaf operand ``s`` of a dot_general, or None when the ghost norm does not apply."""
    dims = _dimension_numbers(eqn)
    other = ins[1 - s]
    if dims is None or dims[1] != ((), ()) or not leaf_alias.iso:
        return None
    if (other is not None and other.leaf == leaf_alias.leaf) or isinstance(eqn.outvars[0], interp.DROPVAR):
        return None
    other_aval = eqn.invars[1 - s].aval
    out_aval = eqn.outvars[0].aval
    return _Site(leaf_alias.leaf, s, dims[0][1 - s], tuple(out_aval.shape), out_aval.dtype,
                 int(np.prod(other_aval.shape, dtype=np.int64)), leaf_alias.chain, dims[0][s])


def _analyze(jaxpr, in_infos, path, uses, top):
    """Records in ``uses[leaf]`` every use of every leaf: ``(path, _Site)`` for a dense site,
    ``"elementwise"`` for a broadcast add/sub/mul, None for any other (opaque) use."""
    env = dict(zip(jaxpr.invars, in_infos))

    def read(a):
        return None if isinstance(a, interp.LITERAL) else env.get(a)

    for idx, eqn in enumerate(jaxpr.eqns):
        p = path + (idx,)
        ins = [read(a) for a in eqn.invars]
        if all(i is None for i in ins):
            continue
        prim = eqn.primitive
        body = interp.call_body(eqn)
        if body is not None:
            env.update(zip(eqn.outvars, _analyze(body.jaxpr, ins, p, uses, False)))
        elif prim in _VIEWS and len(eqn.invars) == 1:
            env[eqn.outvars[0]] = _Alias(ins[0].leaf, ins[0].iso and prim in _ISOMETRIES, ins[0].chain + (eqn,))
        elif prim in _DOT:
            for s, a in enumerate(ins):
                if a is not None:
                    site = _dense_site(eqn, s, ins, p, a)
                    uses[a.leaf].append(None if site is None else (p, site))
        elif prim in _ELEMENTWISE and len(eqn.invars) == 2:
            for s, a in enumerate(ins):
                if a is not None:
                    other = ins[1 - s]
                    ok = (other is None or other.leaf != a.leaf) and _broadcastable(
                        eqn.invars[s].aval.shape, eqn.outvars[0].aval.shape)
                    uses[a.leaf].append("elementwise" if ok else None)
        else:
            for a in ins:
                if a is not None:
                    uses[a.leaf].append(None)
    outs = [read(a) for a in jaxpr.outvars]
    if top:
        for a in outs:
            if a is not None:
                uses[a.leaf].append(None)
    return outs


@dataclasses.dataclass(frozen=True)
class Plan:
    """The route of every parameter leaf, and the tapped evaluation of the one-example predictor.

    ``status[j]`` is one of ``"dense"``, ``"elementwise"``, ``"unused"``, ``"generic"``; ``direct``
    lists the leaves whose per-example gradient the backward pass forms directly; ``reason`` says why
    everything is generic when the tracer could not run (None otherwise).
    """

    status: tuple
    sites: dict  # path of the dot_general equation (through entered calls) -> tuple of _Site
    prefixes: frozenset  # paths of the call equations that contain a site
    closed: Any = None  # ClosedJaxpr of the one-example predictor
    reason: str | None = None

    @property
    def direct(self) -> tuple:
        return tuple(j for j, s in enumerate(self.status) if s in ("elementwise", "generic"))

    def zero_taps(self) -> dict:
        return {p: jnp.zeros(ss[0].out_shape, ss[0].out_dtype) for p, ss in self.sites.items()}

    def forward(self, leaves, xi_leaves, taps):
        """``(phi_i [k], captures)``: the one-example predictor with ``taps[p]`` added to site p's output."""
        caps: dict = {}
        (out,) = _run(self.closed.jaxpr, self.closed.consts, list(leaves) + list(xi_leaves), (), self, taps, caps)
        return out.reshape(-1), caps

    def site_grams(self, caps, d_taps, diag):
        """``[(leaf, Gram [r, r] or [r])]`` of the dense leaves from captures and tap cotangents [r, ...]."""
        return [(site.leaf, _dense_gram(caps[p][i], d_taps[p], site, diag))
                for p, ss in self.sites.items() for i, site in enumerate(ss)]

    def floats_per_example(self, r: int) -> int:
        """Floats held per example for the taps' cotangents and the captured operands."""
        return sum(r * int(np.prod(ss[0].out_shape, dtype=np.int64)) + sum(s.operand_size for s in ss)
                   for ss in self.sites.values())


def generic_plan(num_leaves: int, reason: str | None = None) -> Plan:
    """Every leaf on the generic path."""
    return Plan(("generic",) * num_leaves, {}, frozenset(), None, reason)


def _run(jaxpr, consts, args, path, plan, taps, caps):
    """Evaluates ``jaxpr`` with the taps added at the dense sites, recording their other operands."""

    def select(idx, eqn):
        return path + (idx,) in plan.prefixes or path + (idx,) in plan.sites

    def handle(idx, eqn, invals):
        p = path + (idx,)
        if p in plan.prefixes:
            body = interp.call_body(eqn)
            return _run(body.jaxpr, body.consts, invals, p, plan, taps, caps)
        (out,) = interp.apply(eqn, invals)
        caps[p] = tuple(invals[1 - site.side] for site in plan.sites[p])
        return [out + taps[p]]

    return interp.evaluate(jaxpr, consts, args, select=select, handle=handle)


def gram_of_rows(g, diag):
    """g: [r, p] per-example gradients (one row per cotangent) -> [r] squared norms or [r, r] Gram."""
    if diag:
        return jnp.sum(jnp.square(g), axis=-1)
    return g @ g.T


def site_factors(a, d, site):
    """``(a_m [T, c], d_m [r, T, f])``: a dense site's captured operand and output cotangents as matrices, so that
    the per-example gradient of the kernel for cotangent ``c`` is ``a_m^T d_m[c]`` in the layout of
    :func:`site_matrix` (``T`` rows of the example, ``c`` contracted, ``f`` free entries of the kernel).

    ``a``: the other operand of ``out = dot_general(a, W)`` (either side; one example); ``d``: ``[r, *out_shape]``.
    """
    ca = site.contract
    fa = tuple(i for i in range(a.ndim) if i not in ca)
    r = d.shape[0]
    t = int(np.prod([a.shape[i] for i in fa], dtype=np.int64))
    c = int(np.prod([a.shape[i] for i in ca], dtype=np.int64))
    am = jnp.transpose(a, fa + ca).reshape(t, c)
    f = int(np.prod(d.shape[1:], dtype=np.int64)) // t
    if site.side == 1:
        dm = d.reshape(r, t, f)
    else:
        dm = jnp.swapaxes(d.reshape(r, f, t), 1, 2)
    return am.astype(dm.dtype), dm


def site_matrix(site, leaf):
    """The ``[c, f]`` matrix of a parameter-shaped tensor ``leaf`` at a dense site: the view equations from the leaf
    to the ``dot_general`` operand applied to it, contracted dimensions first (paired with :func:`site_factors`).

    The map is linear, so ``<site_matrix(site, p), a_m^T d_m> = <p, g>`` for the leaf's gradient ``g`` (the adjoint
    of the views carries ``a_m^T d_m`` back to the leaf): an inner product with a per-example gradient taken in the
    site's layout, without forming the gradient.
    """
    w = leaf
    for eqn in site.chain:
        (w,) = interp.apply(eqn, [w])
    free = tuple(i for i in range(w.ndim) if i not in site.leaf_contract)
    c = int(np.prod([w.shape[i] for i in site.leaf_contract], dtype=np.int64))
    return jnp.transpose(w, site.leaf_contract + free).reshape(c, -1)


def _dense_gram(a, d, site, diag):
    """Gram of the per-example gradients of a kernel used as ``out = dot_general(a, W)`` (either side).

    ``a``: the other operand (one example); ``d``: ``[r, *out_shape]`` cotangents of the output.
    """
    am, dm = site_factors(a, d, site)
    r, t, f = dm.shape
    c = am.shape[1]
    if t == 1:
        return jnp.sum(jnp.square(am)) * gram_of_rows(dm[:, 0, :], diag)
    ghost = t * t * c + (r if diag else r * r) * t * t * f
    direct = r * t * c * f + (1 if diag else r) * r * c * f
    if ghost <= direct:
        aa = am @ am.T
        if diag:
            return jnp.einsum("tu,ctf,cuf->c", aa, dm, dm)
        return jnp.einsum("tu,ctf,duf->cd", aa, dm, dm)
    g = jnp.einsum("tC,ctf->cCf", am, dm).reshape(r, -1)
    return gram_of_rows(g, diag)


def warn_fallback(reason: str) -> None:
    warnings.warn(f"lsgeo.per_example: the ghost-norm fast path is off ({reason}); every leaf takes the "
                  f"generic path (same numbers, slower)", FastPathFallbackWarning, stacklevel=3)


def _dry_run(plan, specs, xspecs):
    """Traces the tapped evaluation, its backward pass and both Gram formulas on abstract values."""

    def probe(leaves, xi):
        out, vjp_fn, caps = jax.vjp(lambda t: plan.forward(leaves, xi, t), plan.zero_taps(), has_aux=True)
        (d_taps,) = vjp_fn(jnp.ones_like(out))
        d_taps = {p: v[None] for p, v in d_taps.items()}
        return [g for diag in (False, True) for _, g in plan.site_grams(caps, d_taps, diag)]

    jax.eval_shape(probe, specs, xspecs)


def make_plan(single, leaves, x_leaves) -> Plan:
    """The plan for ``single(leaves, xi_leaves) -> [k]``; ``x_leaves`` carry a leading example axis.

    Cost: one trace of ``single`` and one abstract dry run of the tapped evaluation, no FLOPs.
    """
    num = len(leaves)
    missing = _missing_surface()
    if missing is not None:
        warn_fallback(f"this JAX lacks {missing}")
        return generic_plan(num, f"this JAX lacks {missing}")
    specs = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves]
    xspecs = [jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)) for a in x_leaves]
    closed = jax.make_jaxpr(single)(specs, xspecs)  # the predictor's own errors propagate, as on the generic path
    try:
        uses = {j: [] for j in range(num)}
        _analyze(closed.jaxpr, [_Alias(j, True) for j in range(num)] + [None] * len(xspecs), (), uses, True)
        status, sites = [], {}
        for j in range(num):
            u = uses[j]
            if not u:
                status.append("unused")
            elif len(u) == 1 and isinstance(u[0], tuple):
                status.append("dense")
                sites.setdefault(u[0][0], []).append(u[0][1])
            elif len(u) == 1 and u[0] == "elementwise":
                status.append("elementwise")
            else:
                status.append("generic")
        # sites are keyed by their path of equation indices: a jitted helper called twice shares one
        # inner jaxpr (the same equation objects) at two paths
        sites = {p: tuple(ss) for p, ss in sites.items()}
        prefixes = frozenset(p[:i] for p in sites for i in range(1, len(p)))
        plan = Plan(tuple(status), sites, prefixes, closed)
        if sites:
            _dry_run(plan, specs, xspecs)
        return plan
    except Exception as err:  # noqa: BLE001 - any failure of the interpretation: the generic path
        reason = f"{type(err).__name__}: {err}"
        warn_fallback(reason)
        return generic_plan(num, reason)
