"""Fitting Kronecker factors: per-example layer inputs and output gradients, summed over the data plan.

For example ``i`` and a Kronecker layer (``lsgeo.curvature.operators.kronecker_layers``) with input ``a_i [T, c]`` at
its ``T`` shared positions and output gradients ``D_ir [T, f]`` for the cotangent rows ``r`` of the
Fisher type (``sum_r s_r D_ir^T ... D_ir`` with signs ``s_r = +-1``):

  type-2:        rows ``b_ir`` with ``H_i = B_i diag(s_i) B_i^T`` (``lsgeo.losses.output_hessian_factors``)
  mc:            ``g~_is / sqrt(S)``, ``g~_is = d l(phi_i, y~_is) / d phi_i`` with ``y~_is ~ p(y | phi_i)``
                 drawn as ``MonteCarloFisher`` draws them (``fold_in(fold_in(key, i), s)``)
  empirical:     ``d l(phi_i, y_i) / d phi_i``
  forward-only:  none (``G = I``)

the factors are means over the ``N`` examples of the data set (a bias, when joint, is a ones column of a):

  expand:  A = 1/N sum_i 1/T sum_t a_it a_it^T          G = 1/N sum_i sum_r s_r sum_t D_irt D_irt^T
  reduce:  A = 1/N sum_i abar_i abar_i^T (abar = mean_t)   G = 1/N sum_i sum_r s_r gbar_ir gbar_ir^T (gbar = sum_t)

and the diagonal of a leaf outside any layer is the exact diagonal of the curvature of the Fisher type,
``1/N sum_i sum_r s_r (J_i^T b_ir)^2``. EKFAC's corrections are ``1/N sum_i sum_r s_r (Q_A^T g_ir Q_G)^2``
with ``g_ir = a_i^T D_ir`` the per-example gradient of the layer (George et al. 2018).

The data plan enters in one place, :func:`accumulate` (``objective.map``, ``lsgeo.dataplan.reduce``: microbatches, data
sources, devices, processes; a microbatch contributes its mean with weight ``n_j / n``).

Cost: one forward and ``r`` backward passes per example (vmapped), plus ``O(T (c^2 + r f^2))`` per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lsgeo import losses as losses_lib
from lsgeo.curvature.operators import kronecker_layers as kl
from lsgeo.curvature.operators.fisher import label_sampler

__all__ = ["accumulate", "factor_statistics", "correction_statistics"]


def accumulate(op, fn, operands):
    """``sum_j (n_j / n) fn(op, operands, B_j)`` over the microbatches ``B_j`` of ``op``'s data plan, compiled
    once: the one use of the data plan by the Kronecker operators (``fn`` a module-level function). The result
    is laid out along the sharded parameters' axes (``kronecker_sharding``) where ``op.layout`` says so."""
    return _accumulate(op, operands, fn)


@functools.partial(jax.jit, static_argnums=(2,))
def _accumulate(op, operands, fn):
    total = op.objective.map(lambda ops, mb: fn(ops[0], ops[1], mb), (op.without_data(), operands))
    return total if op.layout is None else op.layout.place_units(total, op.structure.unmatched)


def _unpack(op, mb):
    """``(x, y, index)`` of a microbatch: ``mc`` draws its labels from ``(x, index)``, the others read ``y``."""
    if op.fisher_type == "mc":
        x, index = mb
        return x, index, index
    x, y = mb
    return x, y, None


def cotangent_rows(op, outputs_i, y_i, index_i):
    """``(R [r, k], signs [r] or None)``: the output cotangents of one example for ``op.fisher_type`` (signs None:
    all ``+1``, known when traced, so that no product by them is computed)."""
    shape = (1,) + tuple(outputs_i.shape)
    flat = outputs_i.reshape(-1)

    def one_loss(phi, y):
        return op.loss(phi.reshape(shape), y[None])

    if op.fisher_type == "type-2":
        b, signs = losses_lib.output_hessian_factors(op.loss, outputs_i[None], y_i[None])
        b = b[0]
        return b.T, (None if signs is None else signs[0])
    if op.fisher_type == "empirical":
        return jax.grad(one_loss)(flat, y_i)[None], None
    draw, s = label_sampler(op.loss), op.num_samples

    def sample(j):
        y = draw(jax.random.fold_in(jax.random.fold_in(op.key, index_i), j), outputs_i)
        return jax.grad(one_loss)(flat, y) / jnp.sqrt(jnp.asarray(s, flat.dtype))

    return jax.vmap(sample)(jnp.arange(s)), None


def _per_example(op, params, x_i, y_i, index_i):
    """Layer inputs ``{path: [T, c]}``, output gradients ``{path: [r, T, f]}``, the unmatched leaves'
    per-example squared gradients and the row signs, for one example."""
    structure = op.structure
    leaves = jax.tree_util.tree_leaves(params)
    x_leaves = jax.tree_util.tree_leaves(x_i)
    out_shape = op.output_shape

    def run(taps, unmatched):
        full = list(leaves)
        for j, a in zip(structure.unmatched, unmatched):
            full[j] = a
        out, caps = kl.forward(structure, full, x_leaves, taps)
        return out, caps

    unmatched = [leaves[j] for j in structure.unmatched]
    if op.fisher_type == "forward-only":
        _, caps = run(kl.zero_taps(structure), unmatched)
        return {p: kl.input_matrix(layer, caps[p]) for p, layer in structure.sites.items()}, None, None, None
    out, vjp_fn, caps = jax.vjp(run, kl.zero_taps(structure), unmatched, has_aux=True)
    rows, signs = cotangent_rows(op, out.reshape(out_shape), y_i, index_i)
    d_taps, d_unmatched = jax.vmap(vjp_fn)(rows)
    inputs = {p: kl.input_matrix(layer, caps[p]) for p, layer in structure.sites.items()}
    grads = {p: kl.output_matrix(layer, d_taps[p]) for p, layer in structure.sites.items()}
    squares = [jnp.sum(jnp.square(g), axis=0) if signs is None else jnp.einsum("r,r...->...", signs, jnp.square(g))
               for g in d_unmatched]
    return inputs, grads, squares, signs


def _per_microbatch(op, params, mb):
    x, y, index = _unpack(op, mb)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    index = jnp.zeros(n, jnp.int32) if index is None else index  # a data source: no index (mc is refused there)
    return jax.vmap(lambda xi, yi, ii: _per_example(op, params, xi, yi, ii))(x, y, index), n


def _with_ones(op, layer, a):
    """``a [..., c]`` with a ones column appended when the layer's bias is joint with its kernel."""
    if layer.bias is None or op.separate_weight_and_bias:
        return a
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def factor_statistics(op, params, mb):
    """The microbatch means of ``A``, ``G`` (per layer) and of the unmatched leaves' diagonal."""
    (inputs, grads, squares, signs), n = _per_microbatch(op, params, mb)
    a_factors, g_factors = [], []
    for layer in op.structure.layers:
        a = _with_ones(op, layer, inputs[layer.path])  # [n, T, c']
        rows_a = jnp.mean(a, axis=1) if op.kfac_approx == "reduce" else a.reshape(-1, a.shape[-1])
        a_factors.append(rows_a.T @ rows_a / (n if op.kfac_approx == "reduce" else n * a.shape[1]))
        if grads is None:
            g_factors.append(jnp.eye(layer.f, dtype=a.dtype))
            continue
        d = grads[layer.path]  # [n, r, T, f]
        if op.kfac_approx == "reduce":
            d = jnp.sum(d, axis=2, keepdims=True)
        signed = d if signs is None else d * signs[:, :, None, None]
        g_factors.append(signed.reshape(-1, layer.f).T @ d.reshape(-1, layer.f) / n)  # sum over (i, r, t)
    diag = () if squares is None else tuple(jnp.mean(s, axis=0) for s in squares)
    return {"A": tuple(a_factors), "G": tuple(g_factors), "diag": diag}


def correction_statistics(op, bases, mb):
    """The microbatch means of EKFAC's corrections ``sum_r s_r (Q_A^T g_ir Q_G)^2`` per layer (``[c', f]``,
    and ``[f]`` for a separate bias), given ``bases = (params, Q_A per layer, Q_G per layer)``."""
    params, qa, qg = bases
    (inputs, grads, _, signs), n = _per_microbatch(op, params, mb)
    kernel, bias, all_signs = [], [], signs
    for layer, q_in, q_out in zip(op.structure.layers, qa, qg):
        a = _with_ones(op, layer, inputs[layer.path]) @ q_in  # [n, T, c'] rotated
        d = grads[layer.path] @ q_out  # [n, r, T, f] rotated
        signs = jnp.ones(d.shape[:2], d.dtype) if all_signs is None else all_signs
        if a.shape[1] == 1:
            weighted = jnp.sum(jnp.square(d[:, :, 0]) * signs[:, :, None], axis=1)  # [n, f]
            kernel.append(jnp.square(a[:, 0]).T @ weighted / n)
        else:
            def one(acc, ex):
                ai, di, si = ex
                g = jnp.einsum("tc,rtf->rcf", ai, di)
                return acc + jnp.einsum("r,rcf->cf", si, jnp.square(g)), None

            zero = jnp.zeros((a.shape[2], d.shape[3]), a.dtype)
            kernel.append(jax.lax.scan(one, zero, (a, d, signs))[0] / n)
        if layer.bias is not None and op.separate_weight_and_bias:
            bias.append(jnp.sum(jnp.square(jnp.sum(d, axis=2)) * signs[:, :, None], axis=(0, 1)) / n)
        else:
            bias.append(None)
    return {"kernel": tuple(kernel), "bias": tuple(bias)}
