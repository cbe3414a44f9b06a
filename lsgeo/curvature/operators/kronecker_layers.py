"""The layers of a Kronecker-factored curvature, found in the jaxpr of the one-example predictor.

A *layer* is a parameter leaf ``W`` (the kernel) that the predictor uses exactly once, directly (or through
a dtype cast), as an operand of a ``dot_general`` without batch dimensions whose other operand is not a
parameter, or as the kernel (right-hand side) of a ``conv_general_dilated`` with one feature group. In the
layer's own coordinates it is a matrix ``M = W_mat [c, f]`` (inputs x outputs), applied at ``T`` shared
positions of one example: ``z_t = a_t M`` with ``a [T, c]`` the layer input (for a convolution, the input
patches) and ``z [T, f]`` the output. Its optional *bias* is a leaf broadcast along the leading axes and
added to the layer's output, its shape equal to the output's trailing feature dims (flax ``Dense``,
``DenseGeneral``, ``Conv``). Every other leaf (a LayerNorm scale, an embedding table read by ``gather``, a
bias added elsewhere, a leaf used inside ``scan``) is *unmatched*. A leaf that reaches a ``dot_general`` or
a convolution in any other way (through a reshape or transpose, with batch dimensions, on both sides, or
used again elsewhere: tied weights) is a ValueError naming it: no Kronecker factor can be read off it.

Canonical layout (the Kronecker order of lsgeo): ``W_mat = transpose(W, in_dims + out_dims).reshape(c, f)``,
where ``in_dims`` are the kernel's contracted dimensions (for a convolution: its input-feature dimension,
then its spatial dimensions, the order of ``lax.conv_general_dilated_patches``) and ``out_dims`` the
others. For a flax ``Dense`` kernel ``[d_in, d_out]`` this is the kernel itself, so a block ``A (x) G``
acts on ``ravel(kernel)`` (row-major) with ``A`` the ``d_in x d_in`` input factor first.

The tapped evaluation re-runs the traced predictor with ``lsgeo.jaxpr_interpreter`` (as the ghost-norm
tracer of ``lsgeo.per_example`` does): a zero tap is added to each layer's output (its cotangent is the
output gradient) and the layer's other operand is captured (its input).

Cost: one trace of the predictor, no FLOPs.

>>> import jax.numpy as jnp
>>> single = lambda leaves, xi: jnp.tanh(xi[0] @ leaves[0] + leaves[1]) * leaves[2]
>>> s = find_layers(single, [jnp.ones((3, 2)), jnp.zeros(2), jnp.ones(2)], [jnp.ones((5, 3))])
>>> [(layer.kernel, layer.bias, layer.c, layer.f) for layer in s.layers], s.unmatched
([(0, 1, 3, 2)], (2,))
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import jaxpr_interpreter as interp

__all__ = ["Layer", "Structure", "find_layers", "forward", "input_matrix", "output_matrix", "to_matrix",
           "from_matrix"]

_DOT = interp.primitives("dot_general_p")
_CONV = interp.primitives("conv_general_dilated_p")
_ADD = interp.primitives("add_p")
_CASTS = interp.primitives("convert_element_type_p", "copy_p")
_RESHAPE = interp.primitives("reshape_p")
_BROADCAST = interp.primitives("broadcast_in_dim_p")
_OTHER_VIEWS = interp.primitives("transpose_p", "squeeze_p", "neg_p", "expand_dims_p")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One Kronecker-factored layer (static, hashable).

    kernel, bias: leaf indices (bias None when the layer has none).
    kind: ``"dense"`` or ``"conv"``; path: the equation's path in the jaxpr (through entered calls).
    side: the kernel's operand position; perm: the transpose of the kernel to ``in_dims + out_dims``.
    c, f: input and output features; a_dims: for a dense layer, the other operand's free then contracted dims.
    num_in: how many of the kernel's dims (first in ``perm``) are input dims.
    conv: the convolution's parameters (patch extraction), None for a dense layer.
    """

    kernel: int
    bias: int | None
    kind: str
    path: tuple
    side: int
    perm: tuple
    kernel_shape: tuple
    c: int
    f: int
    a_dims: tuple
    out_shape: tuple
    out_dtype: Any
    num_in: int
    conv: tuple | None = None
    bias_shape: tuple = ()


@dataclasses.dataclass(frozen=True)
class Structure:
    """The layers and the unmatched leaves of a predictor, and its traced one-example jaxpr."""

    layers: tuple
    unmatched: tuple
    closed: Any = dataclasses.field(compare=False, hash=False, default=None)

    @property
    def prefixes(self) -> frozenset:
        return frozenset(layer.path[:i] for layer in self.layers for i in range(1, len(layer.path)))

    @property
    def sites(self) -> dict:
        return {layer.path: layer for layer in self.layers}


@dataclasses.dataclass(frozen=True)
class _Alias:
    leaf: int
    # "direct" (the leaf or a cast), "lead1" (leading 1s added), "bcast" (broadcast along leading axes), "view"
    state: str


def _view_state(eqn, alias, leaf_shape):
    """The alias state of the output of a one-operand view ``eqn`` of ``alias``."""
    prim, r = eqn.primitive, len(leaf_shape)
    if prim in _CASTS:
        return alias.state
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if r == 0 or alias.state not in ("direct", "lead1") or out_shape[len(out_shape) - r:] != tuple(leaf_shape):
        return "view"
    lead = out_shape[: len(out_shape) - r]
    if prim in _RESHAPE:
        return "lead1" if all(s == 1 for s in lead) else "view"
    if prim in _BROADCAST:
        q = len(out_shape)
        dims = tuple(int(d) for d in eqn.params.get("broadcast_dimensions", ()))
        return "bcast" if dims[len(dims) - r:] == tuple(range(q - r, q)) else "view"
    return "view"


@dataclasses.dataclass(frozen=True)
class _Derived:
    """A value computed from parameter leaves only (no data), by primitive ``via``: a transformed kernel."""

    leaves: tuple
    via: str


_DATA = "data"  # a value that depends on the example (an activation)


def _leaves_of(info) -> tuple:
    return (info.leaf,) if isinstance(info, _Alias) else info.leaves if isinstance(info, _Derived) else ()


def _derived(ins, via) -> _Derived:
    return _Derived(tuple(sorted({j for i in ins for j in _leaves_of(i)})), via)


def _analyze(jaxpr, in_infos, path, uses, site_outs, top, shapes):
    """Records in ``uses[leaf]`` every use: ``("kernel", path, side, eqn)``, ``("bias", site_path)``,
    ``("bad", reason)`` or ``("other",)``. ``in_infos``: per input an ``_Alias``/``_Derived`` (parameters),
    ``_DATA`` or None (a constant)."""
    env = dict(zip(jaxpr.invars, in_infos))
    reads = collections.Counter(a for eqn in jaxpr.eqns for a in eqn.invars if not isinstance(a, interp.LITERAL))
    reads.update(a for a in jaxpr.outvars if not isinstance(a, interp.LITERAL))

    def read(a):
        return None if isinstance(a, interp.LITERAL) else env.get(a)

    for idx, eqn in enumerate(jaxpr.eqns):
        p = path + (idx,)
        ins = [read(a) for a in eqn.invars]
        prim = eqn.primitive
        params_in = [i for i in ins if isinstance(i, (_Alias, _Derived))]
        data_in = any(i is _DATA for i in ins)
        body = interp.call_body(eqn)
        if body is not None and params_in:
            outs = _analyze(body.jaxpr, ins, p, uses, {}, False, shapes)
            env.update((v, o) for v, o in zip(eqn.outvars, outs) if o is not None)
            continue
        out = _DATA if data_in else (_derived(params_in, prim.name) if params_in else None)
        if out is not None:
            env.update((v, out) for v in eqn.outvars)
        if not params_in:
            continue
        if prim in _ADD and len(ins) == 2:
            for s in (0, 1):
                a, other = ins[s], eqn.invars[1 - s]
                if a is None or a is _DATA:
                    continue
                site = None if isinstance(other, interp.LITERAL) else site_outs.get(other)
                if (site is not None and isinstance(a, _Alias) and a.state in ("direct", "lead1", "bcast")
                        and reads[other] == 1):
                    uses[a.leaf].append(("bias", site))
                else:
                    for j in _leaves_of(a):
                        uses[j].append(("other",))
        elif (prim in _CASTS or prim in _RESHAPE or prim in _BROADCAST or prim in _OTHER_VIEWS) and len(ins) == 1:
            a = ins[0]
            env[eqn.outvars[0]] = (_Alias(a.leaf, _view_state(eqn, a, shapes[a.leaf])) if isinstance(a, _Alias)
                                   else a)
        elif prim in _DOT or prim in _CONV:
            _kernel_use(eqn, prim in _CONV, ins, p, uses, site_outs)
        else:
            for j in sorted({j for a in params_in for j in _leaves_of(a)}):
                uses[j].append(("other",))
    outs = [read(a) for a in jaxpr.outvars]
    if top:
        for a in outs:
            for j in _leaves_of(a):
                uses[j].append(("other",))
    return outs


def _kernel_use(eqn, is_conv, ins, p, uses, site_outs):
    name = "conv_general_dilated" if is_conv else "dot_general"
    for s, a in enumerate(ins):
        if not isinstance(a, (_Alias, _Derived)):
            continue
        other = ins[1 - s]
        if isinstance(a, _Derived):
            for j in a.leaves:
                uses[j].append(("bad", f"it reaches a {name} through {a.via} (a transformed kernel)"))
        elif isinstance(other, (_Alias, _Derived)):
            uses[a.leaf].append(("bad", f"both operands of a {name} are parameters"))
        elif a.state != "direct":
            uses[a.leaf].append(("bad", f"it reaches a {name} through a reshape, transpose or broadcast"))
        elif is_conv and s != 1:
            uses[a.leaf].append(("bad", "it is the input (not the kernel) of a conv_general_dilated"))
        elif is_conv and (eqn.params.get("feature_group_count", 1) != 1 or eqn.params.get("batch_group_count", 1) != 1):
            uses[a.leaf].append(("bad", "grouped convolutions (feature_group_count > 1) are not supported"))
        elif not is_conv and tuple(map(tuple, eqn.params["dimension_numbers"][1])) != ((), ()):
            uses[a.leaf].append(("bad", "a dot_general with batch dimensions (a per-example kernel) is not supported"))
        else:
            uses[a.leaf].append(("kernel", p, s, eqn))
            site_outs[eqn.outvars[0]] = p


def _make_layer(leaf, p, side, eqn, shape):
    out_aval = eqn.outvars[0].aval
    out_shape, out_dtype = tuple(out_aval.shape), out_aval.dtype
    if eqn.primitive in _CONV:
        lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
        o_dim, i_dim, spatial = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
        perm = (i_dim,) + spatial + (o_dim,)
        conv = (tuple(eqn.params["window_strides"]), tuple(map(tuple, eqn.params["padding"])),
                tuple(eqn.params["lhs_dilation"]), tuple(eqn.params["rhs_dilation"]),
                (tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)), tuple(shape[d] for d in spatial))
        c, f = int(np.prod([shape[d] for d in perm[:-1]])), int(shape[o_dim])
        return Layer(leaf, None, "conv", p, 1, perm, shape, c, f, (), out_shape, out_dtype, len(perm) - 1, conv)
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contract_w, contract_a = (tuple(map(int, rc)), tuple(map(int, lc))) if side == 1 else \
        (tuple(map(int, lc)), tuple(map(int, rc)))
    free_w = tuple(d for d in range(len(shape)) if d not in contract_w)
    a_ndim = len(eqn.invars[1 - side].aval.shape)
    free_a = tuple(d for d in range(a_ndim) if d not in contract_a)
    c = int(np.prod([shape[d] for d in contract_w], dtype=np.int64))
    f = int(np.prod([shape[d] for d in free_w], dtype=np.int64))
    return Layer(leaf, None, "dense", p, side, contract_w + free_w, shape, c, f, free_a + contract_a,
                 out_shape, out_dtype, len(contract_w))


def _bias_fits(layer, shape) -> bool:
    """A bias of ``shape`` broadcast along the leading axes fits the layer when the layer's feature dims are
    the trailing dims of its output, with that shape."""
    if layer.kind == "conv":
        out_spec = layer.conv[4][2]
        return out_spec[1] == len(layer.out_shape) - 1 and tuple(shape) == (layer.f,)
    if layer.side != 1:
        return False
    free_w = tuple(layer.kernel_shape[d] for d in layer.perm[layer.num_in:])
    return tuple(shape) == free_w and tuple(layer.out_shape[len(layer.out_shape) - len(shape):]) == tuple(shape)


def find_layers(single, leaves, x_leaves, names=None) -> Structure:
    """The ``Structure`` of ``single(leaves, xi_leaves) -> [k]`` (``x_leaves`` carry a leading example axis).

    Raises:
      ValueError: a leaf that reaches a ``dot_general`` or convolution in a way no Kronecker factor fits,
        named by ``names[leaf]`` (its path) when given.
    """
    specs = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in leaves]
    xspecs = [jax.ShapeDtypeStruct(tuple(a.shape)[1:], a.dtype) for a in x_leaves]
    closed = jax.make_jaxpr(single)(specs, xspecs)
    uses = {j: [] for j in range(len(leaves))}
    shapes = [tuple(np.shape(a)) for a in leaves]
    _analyze(closed.jaxpr, [_Alias(j, "direct") for j in range(len(leaves))] + [_DATA] * len(xspecs), (), uses, {},
             True, shapes)
    layers, unmatched, biases = {}, [], {}
    for j in range(len(leaves)):
        u = uses[j]
        name = names[j] if names is not None else f"leaf {j}"
        kinds = [x[0] for x in u]
        if "bad" in kinds or ("kernel" in kinds and len(u) > 1):
            reason = next((x[1] for x in u if x[0] == "bad"), "it is used more than once (tied weights)")
            raise ValueError(
                f"parameter {name} (shape {np.shape(leaves[j])}) cannot get a Kronecker factor: {reason}. A Kronecker "
                f"layer is a kernel used once, directly, by a dot_general without batch dimensions or as the kernel of "
                f"a conv_general_dilated")
        if kinds == ["kernel"]:
            _, p, side, eqn = u[0]
            layers[p] = _make_layer(j, p, side, eqn, tuple(np.shape(leaves[j])))
        elif kinds == ["bias"]:
            biases[j] = u[0][1]
        else:
            unmatched.append(j)
    for j, p in biases.items():
        layer = layers.get(p)
        if layer is not None and layer.bias is None and _bias_fits(layer, np.shape(leaves[j])):
            layers[p] = dataclasses.replace(layer, bias=j, bias_shape=tuple(np.shape(leaves[j])))
        else:
            unmatched.append(j)
    ordered = tuple(sorted(layers.values(), key=lambda layer: layer.kernel))
    return Structure(ordered, tuple(sorted(unmatched)), closed)


def forward(structure: Structure, leaves, xi_leaves, taps):
    """``(out [k], inputs)``: the one-example predictor with ``taps[path]`` added to each layer's output, and
    each layer's captured other operand (``inputs[path]``)."""
    sites, prefixes, caps = structure.sites, structure.prefixes, {}

    def run(jaxpr, consts, args, path):
        def select(idx, eqn):
            return path + (idx,) in prefixes or path + (idx,) in sites

        def handle(idx, eqn, invals):
            p = path + (idx,)
            if p in prefixes:
                body = interp.call_body(eqn)
                return run(body.jaxpr, body.consts, invals, p)
            (out,) = interp.apply(eqn, invals)
            caps[p] = invals[1 - sites[p].side]
            return [out + taps[p]]

        return interp.evaluate(jaxpr, consts, args, select=select, handle=handle)

    closed = structure.closed
    (out,) = run(closed.jaxpr, closed.consts, list(leaves) + list(xi_leaves), ())
    return out.reshape(-1), caps


def zero_taps(structure: Structure) -> dict:
    return {layer.path: jnp.zeros(layer.out_shape, layer.out_dtype) for layer in structure.layers}


def input_matrix(layer: Layer, a) -> jax.Array:
    """The layer's input on one example as ``[T, c]`` (a convolution's input patches)."""
    if layer.kind == "conv":
        strides, padding, lhs_dil, rhs_dil, specs, window = layer.conv
        patches = jax.lax.conv_general_dilated_patches(
            a, window, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
            dimension_numbers=jax.lax.ConvDimensionNumbers(*specs))
        out_spec = specs[2]
        return jnp.transpose(patches, (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)).reshape(-1, layer.c)
    return jnp.transpose(a, layer.a_dims).reshape(-1, layer.c)


def output_matrix(layer: Layer, d) -> jax.Array:
    """Output cotangents ``d [r, *out_shape]`` of one example as ``[r, T, f]``."""
    r = d.shape[0]
    if layer.kind == "conv":
        out_spec = tuple(i + 1 for i in layer.conv[4][2])
        return jnp.transpose(d, (0, out_spec[0]) + out_spec[2:] + (out_spec[1],)).reshape(r, -1, layer.f)
    if layer.side == 1:  # out = (a free dims, kernel free dims)
        return d.reshape(r, -1, layer.f)
    return jnp.swapaxes(d.reshape(r, layer.f, -1), 1, 2)  # out = (kernel free dims, a free dims)


def to_matrix(layer: Layer, w) -> jax.Array:
    """The kernel (or a vector shaped like it) as ``W_mat [c, f]``."""
    return jnp.transpose(w, layer.perm).reshape(layer.c, layer.f)


def from_matrix(layer: Layer, m) -> jax.Array:
    """Inverse of :func:`to_matrix`."""
    permuted = tuple(layer.kernel_shape[d] for d in layer.perm)
    return jnp.transpose(m.reshape(permuted), np.argsort(layer.perm))
