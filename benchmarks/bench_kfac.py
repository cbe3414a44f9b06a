"""Benchmark of lsgeo's Kronecker-factored operators (``curvature.KFAC``, ``curvature.EKFAC``) on CPU.

    python benchmarks/bench_kfac.py                    # both models: about 5 CPU-minutes (635 s wall when loaded)
    python benchmarks/bench_kfac.py --models resnet    # one model; --n / --resnet-n: smaller data sets

Two models with softmax cross-entropy, every figure a ratio to one gradient of the mean loss over the same data
with the same microbatches (``lsgeo.Risk.grad``, memory-bounded), measured in one run:

* ``mlp``: a 784-512-512-10 ReLU MLP (flax linen) on ``n`` examples (default 2048), microbatches of 256;
* ``resnet``: ``lsgeo.models.ResNet18`` (CIFAR variant: 3x3 stem, four stages of two basic blocks, widths
  16-32-64-128 at width 16, m = 701,466) on ``resnet_n`` CIFAR-10-shaped inputs ``[32, 32, 3]`` (default 64),
  microbatches of 32; BatchNorm at its running statistics (the examples independent): its 20 convolutions and
  the head are Kronecker layers, the 40 BatchNorm scales and offsets get their exact diagonal.

1. KFAC fit (type-2, expand; the factors over the data set) / gradient            (target <= 1.5)
   and the same with ``fisher_type="mc"`` (one sampled label: curvlinops' default, whose nanoGPT figure the
   target comes from) and ``"empirical"`` (one backward row per example instead of 10), and ``mc`` with
   ``kfac_approx="reduce"`` (Eschenhagen et al. 2023: a convolution's patches summed over positions before the
   outer product, ``(9 c_in)^2`` per example instead of ``T (9 c_in)^2``; the same as expand on the MLP);
2. one damped inverse product ``KFAC.inverse(d) @ g`` (eigendecompositions done once) / gradient (target <= 0.2):
   exact damping (the eigenbasis: four matrix products per layer) and heuristic damping (``heuristic_damping=True``:
   two, ``(A + d_A)^-1 W (G + d_G)^-1``); one KFAC product ``op @ v`` / gradient;
3. the EKFAC correction pass (EKFAC fit minus KFAC fit minus the factors' eigendecompositions) / gradient,
   and the eigendecompositions (``KFAC.inverse(d)`` of a fresh fit: one ``eigh`` per factor, done once per
   operator) / gradient;
4. factor memory / parameter memory (KFAC: A and G; EKFAC: the bases and the corrections).

A fit is timed on its second construction (the first compiles). Timings are interleaved round by round
and the median of per-round ratios is printed, next to the FLOP floor of the same ratio (MLP only: multiply-adds
of the dense algebra, counted from the layer sizes; gradient: forward + backward = 3 x the forward's). The type-2
fit's floor is about 4.9 gradients on this MLP: its ``G`` factors are sums over ``n x 10`` backpropagated rows
(``2 n k f^2`` per layer), so the 1.5 target is reachable for ``mc`` / ``empirical`` (one row), not type-2 here.
On the ResNet the ``A`` factor of a 3x3 convolution costs ``T (9 c_in)^2`` per example against ``T 9 c_in c_out``
for its forward: 9 x the forward's multiply-adds where ``c_out = c_in``, which puts even the one-row fits above 1.5.

Measured (7 Dec 2026, 19:34-19:45 UTC, ``python benchmarks/bench_kfac.py``, 3 rounds, float32, XLA:CPU on the
shared 2-core machine at load average 5-8 from other jobs: 635 s wall, 287 s user; medians, the rounds spread
by up to 3x where noted):

    ratio to one gradient         MLP (n=2048; 217 ms)   floor   ResNet-18 w16 (n=64; 1161 ms)
    KFAC fit, type-2               5.56                  4.85    6.24
    KFAC fit, mc                   1.39                  1.30    3.39
    KFAC fit, empirical            1.40                  1.30    3.12
    KFAC fit, mc, reduce           (= mc: no sharing)            2.47 (rounds 1.80, 3.15; mc expand 3.62 in the same
                                                                 run: ``--models resnet --rounds 2``, 20:19-20:27 UTC)
    inverse product, exact         0.571                 0.385   0.100
    inverse product, heuristic     0.215                 0.193   0.034
    KFAC product                   0.153                 0.193   0.039
    EKFAC correction pass          9.7 (3.4-31)          -       13.1 (5.0-14.6)
    eigendecompositions (once)     13.6 (11.7-20.2)      -       18.7 (12.2-25.8)
    factor / parameter memory      KFAC 2.48, EKFAC 3.48         KFAC 8.38, EKFAC 9.38

The EKFAC correction is noisy because it is a difference of two fits that each include the eigendecompositions;
XLA:CPU's ``eigh`` is slow (a lone 784 x 784 float32 ``eigh`` took 4.7 s on the loaded machine), which dominates
that column and is paid once per operator. The ResNet's factor memory is large because its ``A`` factors
(``(9 c_in)^2``, up to 1152 x 1152) outweigh their kernels (``9 c_in c_out``).
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
from lsgeo import curvature, losses, models


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


def fitted(cls, predict, loss, params, data, kw, **extra):
    """``(operator, seconds)``: a fresh fit, its factors ready."""
    t0 = time.perf_counter()
    op = cls(predict, loss, params, data, **kw, **extra)
    jax.block_until_ready(op.factors)
    return op, time.perf_counter() - t0


def bench(title, predict, params, data, microbatch_size, rounds, floors=None):
    """Prints the ratios to one gradient of every measured operation (median over ``rounds``, interleaved)."""
    loss = losses.softmax_cross_entropy
    device = [jax.devices()[0]]
    risk = lsgeo.Risk(predict, loss, data, microbatch_size=microbatch_size, devices=device)
    grad = jax.jit(lambda r, p: r.grad(p))
    kw = dict(microbatch_size=microbatch_size, devices=device)
    mc = dict(fisher_type="mc", key=jax.random.key(1))
    variants = {"kfac": {}, "kfac_emp": dict(fisher_type="empirical"), "kfac_mc": mc,
                "kfac_mc_reduce": dict(mc, kfac_approx="reduce")}
    ops = {k: fitted(curvature.KFAC, predict, loss, params, data, kw, **v)[0] for k, v in variants.items()}
    ops["ekfac"] = fitted(curvature.EKFAC, predict, loss, params, data, kw)[0]  # every fit compiled
    g = grad(risk, params)
    inverse = ops["kfac"].inverse(1e-3)
    heuristic = ops["kfac"].inverse(1e-3, heuristic_damping=True)
    for product in (inverse @ g, heuristic @ g, ops["kfac"] @ g):
        jax.block_until_ready(product)
    ratios = {k: [] for k in ("kfac_fit", "kfac_fit_mc", "kfac_fit_mc_reduce", "kfac_fit_empirical", "inverse_product",
                              "inverse_product_heuristic", "kfac_product", "ekfac_correction", "eigendecompositions")}
    for _ in range(rounds):
        t_grad = timed(lambda: grad(risk, params))
        fresh, t_kfac = fitted(curvature.KFAC, predict, loss, params, data, kw)
        t_mc = fitted(curvature.KFAC, predict, loss, params, data, kw, **mc)[1]
        t_emp = fitted(curvature.KFAC, predict, loss, params, data, kw, fisher_type="empirical")[1]
        t_reduce = fitted(curvature.KFAC, predict, loss, params, data, kw, kfac_approx="reduce", **mc)[1]
        t_ekfac = fitted(curvature.EKFAC, predict, loss, params, data, kw)[1]
        t_eigh = timed(lambda: fresh.inverse(1e-3).units)  # a fresh fit: its eigendecompositions not yet done
        t_inv = timed(lambda: inverse @ g)
        t_heuristic = timed(lambda: heuristic @ g)
        t_prod = timed(lambda: ops["kfac"] @ g)
        ratios["kfac_fit"].append(t_kfac / t_grad)
        ratios["kfac_fit_mc"].append(t_mc / t_grad)
        ratios["kfac_fit_empirical"].append(t_emp / t_grad)
        ratios["kfac_fit_mc_reduce"].append(t_reduce / t_grad)
        ratios["ekfac_correction"].append((t_ekfac - t_kfac - t_eigh) / t_grad)
        ratios["eigendecompositions"].append(t_eigh / t_grad)
        ratios["inverse_product"].append(t_inv / t_grad)
        ratios["inverse_product_heuristic"].append(t_heuristic / t_grad)
        ratios["kfac_product"].append(t_prod / t_grad)
    param_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    print(f"{title}, m={sum(a.size for a in jax.tree_util.tree_leaves(params))}, microbatches of {microbatch_size}, "
          f"{jax.devices()[0].platform}; {ops['kfac']!r}; gradient {t_grad * 1e3:.1f} ms (last round)")
    for name, values in ratios.items():
        floor = f"{floors[name]:6.3f}" if floors and name in floors else "     -"
        print(f"  {name:<26s} / gradient: {statistics.median(values):6.3f}   FLOP floor {floor}   (rounds: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    for name in ("kfac", "ekfac"):
        print(f"  {name} factor memory / parameter memory: {ops[name].factor_bytes() / param_bytes:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp,resnet", help="comma-separated: mlp, resnet")
    parser.add_argument("--n", type=int, default=2048, help="MLP examples")
    parser.add_argument("--microbatch-size", type=int, default=256, help="MLP microbatch")
    parser.add_argument("--resnet-n", type=int, default=64, help="ResNet-18 examples")
    parser.add_argument("--resnet-microbatch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    chosen = args.models.split(",")
    if set(chosen) - {"mlp", "resnet"}:
        raise ValueError(f"--models takes mlp and resnet, got {args.models!r}")
    if "mlp" in chosen:
        model = MLP()
        x = jnp.asarray(rng.standard_normal((args.n, 784)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, args.n))
        params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
        bench(f"MLP 784-512-512-10, n={args.n}", lambda p, x: model.apply({"params": p}, x), params, (x, y),
              args.microbatch_size, args.rounds, flop_floors((784, 512, 512, 10), args.n))
    if "resnet" in chosen:
        resnet = models.ResNet18(num_classes=10, width=16)
        x = jnp.asarray(rng.standard_normal((args.resnet_n, 32, 32, 3)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, args.resnet_n))
        variables = resnet.init(jax.random.PRNGKey(0), x[:1])
        stats = variables["batch_stats"]  # BatchNorm at its running statistics: examples independent

        def predict(p, x):
            return resnet.apply({"params": p, "batch_stats": stats}, x)

        bench(f"ResNet-18 width 16, 32x32x3, n={args.resnet_n}", predict, variables["params"], (x, y),
              args.resnet_microbatch_size, args.rounds)


if __name__ == "__main__":
    main()
