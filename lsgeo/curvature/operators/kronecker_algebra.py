"""Linear algebra of block-diagonal Kronecker-factored matrices, in their eigenbasis.

Every Kronecker operator (``KFAC``, ``EKFAC``) and its damped inverse is, per layer, ``(Q_A (x) Q_G)
diag(vec(L)) (Q_A (x) Q_G)^T`` acting on the layer's matrix ``W_mat [c', f]`` (the kernel in the layer's
canonical layout, plus a bias row when the bias is joint): ``W -> Q_A (L * (Q_A^T W Q_G)) Q_G^T``. A
separate bias is ``Q_G diag(l_b) Q_G^T``, and a leaf in no layer a diagonal ``diag(d)``. For KFAC
``L = lambda_A lambda_G^T`` (``A = Q_A diag(lambda_A) Q_A^T``, ``G = Q_G ...``); for EKFAC ``L`` is refitted.
A function ``h`` of the operator (inverse, damped inverse) is ``h(L)`` in the same basis.

Units (a pytree): ``{"qa": per layer [c', c'], "qg": per layer [f, f], "lam": per layer [c', f],
"lam_bias": per layer [f] or None, "diag": per unmatched leaf, leaf-shaped}``.

Where ``L`` is an outer product (KFAC itself, KFAC's heuristically damped inverse) the operator is a plain
Kronecker product per layer, ``W -> P_A W P_G`` with symmetric ``P_A [c', c']``, ``P_G [f, f]``: *Kronecker
units* ``{"pa", "pg", "pb": per layer [f, f] or None (a separate bias: b -> P_b b), "diag"}``, applied by
the same :func:`apply_units` with two matrix products per layer instead of four.

Cost of a product: ``O(c'^2 f + c' f^2)`` per layer, no data (Kronecker units: half of it).
"""

from __future__ import annotations

import jax.numpy as jnp

from lsgeo.curvature.operators import kronecker_layers as kl

__all__ = ["apply_units", "kronecker_units", "layer_matrix", "split_matrix", "map_eigenvalues", "all_eigenvalues",
           "unit_diagonal"]


def layer_matrix(layer, joint, leaves):
    """The layer's ``W_mat [c', f]`` from the leaves (a joint bias as its last row)."""
    m = kl.to_matrix(layer, leaves[layer.kernel])
    if joint:
        m = jnp.concatenate([m, leaves[layer.bias].reshape(1, layer.f).astype(m.dtype)], axis=0)
    return m


def split_matrix(layer, joint, m, out):
    """Writes ``W_mat`` back into the leaf list ``out``."""
    if joint:
        out[layer.bias] = m[-1].reshape(layer.bias_shape)
        m = m[:-1]
    out[layer.kernel] = kl.from_matrix(layer, m)


def apply_units(structure, separate, units, leaves):
    """The block-diagonal operator of ``units`` (eigenbasis units or Kronecker units) applied to the full
    leaf list ``leaves`` (a list)."""
    out, kronecker = list(leaves), "pa" in units
    for i, layer in enumerate(structure.layers):
        joint = layer.bias is not None and not separate
        m = layer_matrix(layer, joint, leaves)
        if kronecker:
            m = units["pa"][i].astype(m.dtype) @ m @ units["pg"][i].astype(m.dtype)
        else:
            qa, qg = units["qa"][i], units["qg"][i]
            m = qa @ (units["lam"][i] * (qa.T @ m @ qg)) @ qg.T
        split_matrix(layer, joint, m, out)
        if layer.bias is not None and separate:
            b = leaves[layer.bias].reshape(layer.f)
            if kronecker:
                b = units["pb"][i].astype(b.dtype) @ b
            else:
                qg = units["qg"][i]
                b = qg @ (units["lam_bias"][i] * (qg.T @ b))
            out[layer.bias] = b.reshape(layer.bias_shape)
    for j, d in zip(structure.unmatched, units["diag"]):
        out[j] = d.astype(leaves[j].dtype) * leaves[j]
    return out


def kronecker_units(pa, pg, pb, diag):
    """Kronecker units (``W -> P_A W P_G`` per layer, ``b -> P_b b``, a diagonal per unmatched leaf)."""
    return {"pa": tuple(pa), "pg": tuple(pg), "pb": tuple(pb), "diag": tuple(diag)}


def map_eigenvalues(units, fn):
    """The units of ``h(op)`` for an elementwise ``fn`` of the eigenvalues."""
    return {"qa": units["qa"], "qg": units["qg"], "lam": tuple(fn(x) for x in units["lam"]),
            "lam_bias": tuple(None if x is None else fn(x) for x in units["lam_bias"]),
            "diag": tuple(fn(x) for x in units["diag"])}


def all_eigenvalues(units) -> jnp.ndarray:
    """Every eigenvalue (``m`` of them), unsorted."""
    parts = [x.reshape(-1) for x in units["lam"]] + [x for x in units["lam_bias"] if x is not None]
    parts += [x.reshape(-1) for x in units["diag"]]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,))


def unit_diagonal(structure, separate, units, template):
    """``diag`` of the operator, as a leaf list shaped like ``template`` (a list of arrays)."""
    out = list(template)
    for i, layer in enumerate(structure.layers):
        joint = layer.bias is not None and not separate
        qa, qg = units["qa"][i], units["qg"][i]
        split_matrix(layer, joint, jnp.square(qa) @ units["lam"][i] @ jnp.square(qg).T, out)
        if layer.bias is not None and separate:
            out[layer.bias] = (jnp.square(qg) @ units["lam_bias"][i]).reshape(layer.bias_shape)
    for j, d in zip(structure.unmatched, units["diag"]):
        out[j] = d
    return out
