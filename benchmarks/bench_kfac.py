"""Benchmark of lsgeo's Kronecker-factored operators (``curvature.KFAC``, ``curvature.EKFAC``) on CPU.

    python benchmarks/bench_kfac.py                 # about 2-4 minutes on a 2-core CPU
    python benchmarks/bench_kfac.py --n 512         # smaller data set

On a 784-512-512-10 ReLU MLP (flax linen) with softmax cross-entropy on ``n`` examples (default 2048),
microbatches of 256, every figure a ratio to one gradient of the mean loss over the same data with the same
microbatches (``lsgeo.Risk.grad``, memory-bounded), measured in one run:

1. KFAC fit (type-2, expand; the factors over the data set) / gradient            (target <= 1.5)
   and the same with ``fisher_type="empirical"`` (one backward pass per example instead of 10);
2. one damped inverse product ``KFAC.inverse(d) @ g`` (eigendecompositions done once) / gradient (target <= 0.2);
   one KFAC product ``op @ v`` / gradient;
3. the EKFAC correction pass (EKFAC fit minus KFAC fit minus the factors' eigendecompositions) / gradient,
   and the eigendecompositions (``KFAC.inverse(d)``: one ``eigh`` per factor, done once) / gradient;
4. factor memory / parameter memory (KFAC: A and G; EKFAC: the bases and the corrections).

A fit is timed on its second construction (the first compiles). Timings are interleaved round by round
and the median of per-round ratios is printed.
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

    ops = {"kfac": fit(curvature.KFAC), "kfac_emp": fit(curvature.KFAC, fisher_type="empirical"),
           "ekfac": fit(curvature.EKFAC)}  # compiles
    g = grad(risk, params)
    inverse = ops["kfac"].inverse(1e-3)
    jax.block_until_ready(inverse @ g)
    jax.block_until_ready(ops["kfac"] @ g)
    ratios = {k: [] for k in ("kfac_fit", "kfac_fit_empirical", "inverse_product", "kfac_product", "ekfac_correction",
                              "eigendecompositions")}
    for _ in range(args.rounds):
        t_grad = timed(lambda: grad(risk, params))
        t_kfac = timed(lambda: fit(curvature.KFAC).factors)
        t_emp = timed(lambda: fit(curvature.KFAC, fisher_type="empirical").factors)
        t_ekfac = timed(lambda: fit(curvature.EKFAC).factors)
        t_eigh = timed(lambda: ops["kfac"].inverse(1e-3).units)
        t_inv = timed(lambda: inverse @ g)
        t_prod = timed(lambda: ops["kfac"] @ g)
        ratios["kfac_fit"].append(t_kfac / t_grad)
        ratios["kfac_fit_empirical"].append(t_emp / t_grad)
        ratios["ekfac_correction"].append((t_ekfac - t_kfac - t_eigh) / t_grad)
        ratios["eigendecompositions"].append(t_eigh / t_grad)
        ratios["inverse_product"].append(t_inv / t_grad)
        ratios["kfac_product"].append(t_prod / t_grad)
    param_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    print(f"MLP 784-512-512-10, n={args.n}, microbatches of {args.microbatch_size}, {jax.devices()[0].platform}; "
          f"gradient {t_grad * 1e3:.1f} ms (last round)")
    for name, values in ratios.items():
        print(f"  {name:<22s} / gradient: {statistics.median(values):6.3f}   (rounds: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    for name in ("kfac", "ekfac"):
        print(f"  {name} factor memory / parameter memory: {ops[name].factor_bytes() / param_bytes:.3f}")


if __name__ == "__main__":
    main()
