"""Benchmark of lsgeo's Kronecker-factored operators (``curvature.KFAC``, ``curvature.EKFAC``) on CPU.

    python benchmarks/bench_kfac.py                 # about 2-4 minutes on a 2-core CPU
    python benchmarks/bench_kfac.py --n 512         # smaller data set

On a 784-512-512-10 ReLU MLP (flax linen) with softmax cross-entropy on ``n`` examples (default 2048),
microbatches of 256, every figure a ratio to one gradient of the mean loss over the same data with the same
microbatches (``lsgeo.Risk.grad``, memory-bounded), measured in one run:

1. KFAC fit (type-2, expand; the factors over the data set) / gradient            (target <= 1.5)
   and the same with ``fisher_type="mc"`` (one sampled label: curvlinops' default, whose nanoGPT figure the
   target comes from) and ``"empirical"`` (one backward row per example instead of 10);
2. one damped inverse product ``KFAC.inverse(d) @ g`` (eigendecompositions done once) / gradient (target <= 0.2):
   exact damping (the eigenbasis: four matrix products per layer) and heuristic damping (``heuristic_damping=True``:
   two, ``(A + d_A)^-1 W (G + d_G)^-1``); one KFAC product ``op @ v`` / gradient;
3. the EKFAC correction pass (EKFAC fit minus KFAC fit minus the factors' eigendecompositions) / gradient,
   and the eigendecompositions (``KFAC.inverse(d)``: one ``eigh`` per factor, done once) / gradient;
4. factor memory / parameter memory (KFAC: A and G; EKFAC: the bases and the corrections).

A fit is timed on its second construction (the first compiles). Timings are interleaved round by round
and the median of per-round ratios is printed, next to the FLOP floor of the same ratio (multiply-adds of the
dense algebra, counted from the layer sizes; gradient: forward + backward = 3 x the forward's). The type-2
fit's floor is about 4.9 gradients on this MLP: its ``G`` factors are sums over ``n x 10`` backpropagated rows
(``2 n k f^2`` per layer), so the 1.5 target is reachable for ``mc`` / ``empirical`` (one row), not type-2 here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lsgeo
from lsgeo import curvature, losses


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (512, 512):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def flop_floors(widths, n) -> dict:
    """Multiply-adds of each measured operation / those of one gradient, for an MLP of ``widths`` (T = 1)."""
    dims = list(zip(widths[:-1], widths[1:]))
    k = widths[-1]
    forward = n * sum(c * f for c, f in dims)
    gradient = 3 * forward
    a_factors = n * sum(c * c for c, _ in dims)

    def fit(rows):  # forward, A, the rows backpropagated to every layer's output, G
        backprop = n * rows * sum(c * f for c, f in dims[1:])
        return (forward + a_factors + backprop + n * rows * sum(f * f for _, f in dims)) / gradient

    product = sum(c * c * f + c * f * f for c, f in dims) / gradient
    return {"kfac_fit": fit(k), "kfac_fit_mc": fit(1), "kfac_fit_empirical": fit(1), "inverse_product": 2 * product,
            "inverse_product_heuristic": product, "kfac_product": product}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--microbatch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = MLP()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.n, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.n))
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    predict = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    loss = losses.softmax_cross_entropy
    risk = lsgeo.Risk(predict, loss, (x, y), microbatch_size=args.microbatch_size, devices=[jax.devices()[0]])
    grad = jax.jit(lambda r, p: r.grad(p))
    kw = dict(microbatch_size=args.microbatch_size, devices=[jax.devices()[0]])

    def fit(cls, **extra):
        return cls(predict, loss, params, (x, y), **kw, **extra)

    mc = dict(fisher_type="mc", key=jax.random.key(1))
    ops = {"kfac": fit(curvature.KFAC), "kfac_emp": fit(curvature.KFAC, fisher_type="empirical"),
           "kfac_mc": fit(curvature.KFAC, **mc), "ekfac": fit(curvature.EKFAC)}  # compiles
    g = grad(risk, params)
    inverse = ops["kfac"].inverse(1e-3)
    heuristic = ops["kfac"].inverse(1e-3, heuristic_damping=True)
    for product in (inverse @ g, heuristic @ g, ops["kfac"] @ g):
        jax.block_until_ready(product)
    ratios = {k: [] for k in ("kfac_fit", "kfac_fit_mc", "kfac_fit_empirical", "inverse_product",
                              "inverse_product_heuristic", "kfac_product", "ekfac_correction", "eigendecompositions")}
    for _ in range(args.rounds):
        t_grad = timed(lambda: grad(risk, params))
        t_kfac = timed(lambda: fit(curvature.KFAC).factors)
        t_mc = timed(lambda: fit(curvature.KFAC, **mc).factors)
        t_emp = timed(lambda: fit(curvature.KFAC, fisher_type="empirical").factors)
        t_ekfac = timed(lambda: fit(curvature.EKFAC).factors)
        t_eigh = timed(lambda: ops["kfac"].inverse(1e-3).units)
        t_inv = timed(lambda: inverse @ g)
        t_heuristic = timed(lambda: heuristic @ g)
        t_prod = timed(lambda: ops["kfac"] @ g)
        ratios["kfac_fit"].append(t_kfac / t_grad)
        ratios["kfac_fit_mc"].append(t_mc / t_grad)
        ratios["kfac_fit_empirical"].append(t_emp / t_grad)
        ratios["ekfac_correction"].append((t_ekfac - t_kfac - t_eigh) / t_grad)
        ratios["eigendecompositions"].append(t_eigh / t_grad)
        ratios["inverse_product"].append(t_inv / t_grad)
        ratios["inverse_product_heuristic"].append(t_heuristic / t_grad)
        ratios["kfac_product"].append(t_prod / t_grad)
    param_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    floors = flop_floors((784, 512, 512, 10), args.n)
    print(f"MLP 784-512-512-10, n={args.n}, microbatches of {args.microbatch_size}, {jax.devices()[0].platform}; "
          f"gradient {t_grad * 1e3:.1f} ms (last round)")
    for name, values in ratios.items():
        floor = f"{floors[name]:6.3f}" if name in floors else "     -"
        print(f"  {name:<26s} / gradient: {statistics.median(values):6.3f}   FLOP floor {floor}   (rounds: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    for name in ("kfac", "ekfac"):
        print(f"  {name} factor memory / parameter memory: {ops[name].factor_bytes() / param_bytes:.3f}")


if __name__ == "__main__":
    main()
