"""Hand-built Kronecker references for the KFAC / EKFAC tests: layer inputs and output gradients computed
explicitly from tapped per-example models (no lsgeo jaxpr code), then the factors and the dense matrix."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lsgeo.curvature.operators.fisher import label_sampler


def mlp_predict(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mlp_tapped(p, xi, taps):
    """``(phi_i [k], inputs {layer: [T, c]})`` with ``taps`` added to each layer's output."""
    h = jnp.tanh(xi @ p["w1"] + p["b1"] + taps["1"])
    return h @ p["w2"] + p["b2"] + taps["2"], {"1": xi[None], "2": h[None]}


def seq_predict(p, x):  # a dense layer shared over the sequence axis, then a dense layer on the flattened sequence
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h.reshape(h.shape[0], -1) @ p["w2"] + p["b2"]


def seq_tapped(p, xi, taps):
    h = jnp.tanh(xi @ p["w1"] + p["b1"] + taps["1"])
    return h.reshape(-1) @ p["w2"] + p["b2"] + taps["2"], {"1": xi, "2": h.reshape(1, -1)}


LAYERS = {"1": ("w1", "b1"), "2": ("w2", "b2")}


def params_and_data(key, *, seq: bool, n=7, d=3, hidden=4, k=3, length=2, dtype=jnp.float64):
    ks = jax.random.split(key, 6)
    d1 = d
    d2 = hidden * length if seq else hidden
    p = {"w1": jax.random.normal(ks[0], (d1, hidden), dtype) / 2, "b1": jax.random.normal(ks[1], (hidden,), dtype),
         "w2": jax.random.normal(ks[2], (d2, k), dtype) / 2, "b2": jax.random.normal(ks[3], (k,), dtype)}
    x = jax.random.normal(ks[4], (n, length, d) if seq else (n, d), dtype)
    y = jax.random.randint(ks[5], (n,), 0, k)
    return p, x, y


def rows(loss, fisher_type, phi, yi, index, key, num_samples):
    """Cotangent rows ``[r, k]`` of one example (explicit: eigh of the loss Hessian for type-2)."""
    one = lambda o, y: loss(o[None], y[None])  # noqa: E731
    if fisher_type == "type-2":
        lam, u = jnp.linalg.eigh(jax.hessian(one)(phi, yi))
        return (u * jnp.sqrt(jnp.clip(lam, 0.0))).T
    if fisher_type == "empirical":
        return jax.grad(one)(phi, yi)[None]
    draw = label_sampler(loss)
    wrapped = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    ys = [draw(jax.random.fold_in(jax.random.fold_in(wrapped, index), s), phi) for s in range(num_samples)]
    return jnp.stack([jax.grad(one)(phi, ys_) for ys_ in ys]) / np.sqrt(num_samples)


def layer_data(tapped, loss, p, x, y, fisher_type, key=None, num_samples=1):
    """Per layer: inputs ``[n, T, c]`` and output gradients ``[n, r, T, f]`` (None for forward-only)."""
    shared = x.shape[1:-1]  # the sequence axis of the first layer (none for the MLP)
    taps0 = {"1": jnp.zeros(shared + (p["w1"].shape[1],), x.dtype), "2": jnp.zeros(p["w2"].shape[1], x.dtype)}

    def one(xi, yi, i):
        phi, ins = tapped(p, xi, taps0)
        if fisher_type == "forward-only":
            return ins, None
        jz = jax.jacobian(lambda t: tapped(p, xi, t)[0])(taps0)  # {layer: [k, *tap shape]}
        r = rows(loss, fisher_type, phi, yi, i, key, num_samples)
        grads = {name: jnp.einsum("rk,ktf->rtf", r, jz[name].reshape(jz[name].shape[0], -1, p[w].shape[1]))
                 for name, (w, _) in LAYERS.items()}
        return ins, grads

    return jax.jit(jax.vmap(one))(x, y, jnp.arange(x.shape[0]))


def factors(inputs, grads, approx, separate, p):
    out = {}
    for name, (w, _) in LAYERS.items():
        a = inputs[name]
        if not separate:
            a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
        n, t = a.shape[:2]
        if approx == "expand":
            fa = jnp.einsum("ntc,ntd->cd", a, a) / (n * t)
        else:
            fa = jnp.einsum("nc,nd->cd", a.mean(1), a.mean(1)) / n
        f = p[w].shape[1]
        if grads is None:
            fg = jnp.eye(f, dtype=a.dtype)
        elif approx == "expand":
            fg = jnp.einsum("nrtf,nrtg->fg", grads[name], grads[name]) / n
        else:
            gbar = grads[name].sum(2)
            fg = jnp.einsum("nrf,nrg->fg", gbar, gbar) / n
        out[name] = (fa, fg)
    return out


def kfac_apply(fs, separate, v):
    out = {}
    for name, (w, b) in LAYERS.items():
        fa, fg = fs[name]
        if separate:
            out[w] = fa @ v[w] @ fg
            out[b] = fg @ v[b]
        else:
            m = fa @ jnp.concatenate([v[w], v[b][None]], axis=0) @ fg
            out[w], out[b] = m[:-1], m[-1]
    return out


def dense(apply, p):
    flat, unravel = ravel_pytree(p)
    return jax.vmap(lambda e: ravel_pytree(apply(unravel(e)))[0])(jnp.eye(flat.size, dtype=flat.dtype))


def ekfac_apply(fs, inputs, grads, separate, v):
    """EKFAC: the Kronecker eigenbasis of ``fs`` with the exact per-example second moments in it."""
    out = {}
    for name, (w, b) in LAYERS.items():
        fa, fg = fs[name]
        qa, qg = jnp.linalg.eigh(fa)[1], jnp.linalg.eigh(fg)[1]
        a = inputs[name]
        if not separate:
            a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
        g = jnp.einsum("ntc,nrtf->nrcf", a, grads[name])  # per-example gradients
        lam = jnp.mean(jnp.sum(jnp.square(jnp.einsum("ca,nrcf,fg->nrag", qa, g, qg)), axis=1), axis=0)
        m = v[w] if separate else jnp.concatenate([v[w], v[b][None]], axis=0)
        m = qa @ (lam * (qa.T @ m @ qg)) @ qg.T
        if separate:
            out[w] = m
            gb = jnp.einsum("nrtf->nrf", grads[name]) @ qg
            lam_b = jnp.mean(jnp.sum(jnp.square(gb), axis=1), axis=0)
            out[b] = qg @ (lam_b * (qg.T @ v[b]))
        else:
            out[w], out[b] = m[:-1], m[-1]
    return out


def patches_3x3_same(xi):
    """``[H W, 9 C]`` patches of a ``[H, W, C]`` image (3x3 window, stride 1, zero 'SAME' padding), each in
    the (kh, kw, c) order of a flax ``Conv`` kernel ``[3, 3, C, O]`` reshaped to ``[9 C, O]``."""
    h, w, _ = xi.shape
    xp = jnp.pad(xi, ((1, 1), (1, 1), (0, 0)))
    return jnp.stack([xp[i:i + 3, j:j + 3, :].reshape(-1) for i in range(h) for j in range(w)])


def cnn_tapped(p, xi, taps):
    """A 3x3 convolution (``w1 [9 C, O]``) by explicit patches, tanh, then a dense layer on the flattened map."""
    pt = patches_3x3_same(xi)
    z = pt @ p["w1"] + p["b1"] + taps["1"].reshape(pt.shape[0], -1)
    h = jnp.tanh(z)
    return h.reshape(-1) @ p["w2"] + p["b2"] + taps["2"], {"1": pt, "2": h.reshape(1, -1)}
