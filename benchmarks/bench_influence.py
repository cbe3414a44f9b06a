"""Benchmark of lsgeo.influence: pairwise influence scores against the cost of the per-example gradients, and
peak memory against n_train.

    python benchmarks/bench_influence.py                        # the issue's size: 8192 x 128, 784-512-512-10 MLP
    python benchmarks/bench_influence.py --n-train 1024         # what a shared 2-core CPU finishes in minutes

1. Time of ``pairwise_scores`` (n_train x n_query) divided by the time of computing the n_train per-example
   loss gradients once (the same chunked ``vmap`` of ``jax.grad``, each gradient reduced to its squared norm so
   that nothing of size n m is kept: what any method that forms every training gradient pays; re-timed just before
   each method, as the shared machine's load drifts), for the inverses ``identity`` (gradient dot products),
   ``lowrank`` (rank 32; the Lanczos eigenpairs, built once, timed apart) and ``ekfac`` (fitted once, timed apart):
   ``method="generic"`` (every gradient formed and contracted; the reference), the default factored route with whole
   preconditioned queries (``a_i P_q delta_i^T``, one GEMM per chunk), and ``query_rank=32`` (rank-32 query
   gradients per kernel); then how far the rank-32 scores are from the whole ones (max difference, Spearman per
   query). Each after a warm-up call (compilation), median of ``--repeats``.
2. Peak memory vs n_train: the peak resident set of a fresh process that scores n_train examples against 8
   queries (identity, blocks of 1024 examples, ``examples_per_chunk`` gradients at a time): flat in n_train up
   to the inputs and the [n_train, n_query] output (CPU; the process's RSS includes XLA and the compiler).

Model: ReLU MLP 784-512-512-10 (669,706 parameters), softmax cross-entropy, Gaussian inputs, float32.

Measured (7 Dec 2026, 2 CPU cores shared with other jobs, load 5-8, so times drift by up to 3x between lines; these
runs timed the gradients once, at the start, before the re-timing per method was added):
  8192 x 128 (the issue's size; ``--repeats 1 --skip-generic``, 20:12-20:22 UTC; gradients 5.77 s at the start):
    identity, factored 0.07x; lowrank whole 4.62x, query_rank 32 0.83x; ekfac whole 7.11x, query_rank 32 2.63x;
    rank-32 vs whole EKFAC scores: max |difference| 7.7e-4 of the largest, Spearman per query 1.0000 (min 1.0000);
    peak RSS 2266 MiB at n_train 1024, 2048, 4096 and 8192.
  1024 x 128 (``--n-train 1024 --repeats 1``): identity generic 7.20x, factored 0.05x (equal to 9e-7 of the
    largest, float32); ekfac generic 7.69x, whole (factored) 3.11x (equal to 6.5e-7), query_rank 32 3.42x (the 128
    EKFAC inverse products and SVDs, a fixed cost, dominate at this n); an earlier 8192 run: identity generic 5.67x.
What bounds each ratio: whole queries cost 2 Q m flops per training example against about 6 m for its gradient
(Q = 128: 43x in flops; measured 4.6-7x because the per-example gradients run far below the GEMM's speed), so the
<= 3 target needs the factored forms: exact for identity (a forward and backward pass, never the c x f gradient),
and rank-r query gradients for curvature-aware inverses (Kronfluence's query_gradient_low_rank), whose cost then
is the Q inverse products (fixed) plus Q r (c + f) per example and kernel.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lsgeo import curvature, influence, losses
from lsgeo.influence import gradients as grads_lib


def mlp(key, sizes=(784, 512, 512, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    params = {f"Dense_{i}": {"kernel": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "bias": jnp.zeros(b)}
              for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}

    def predict(p, x):
        for i in range(len(sizes) - 1):
            x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            x = jax.nn.relu(x) if i < len(sizes) - 2 else x
        return x

    return predict, params


def data(key, n):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, 784)), jax.random.randint(ky, (n,), 0, 10)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def gradient_norms(predict, loss, chunk, params, x, y):
    """The per-example gradients, each reduced to its squared norm (the baseline)."""
    square = lambda g, i: sum(jnp.sum(a * a) for a in jax.tree_util.tree_leaves(g))  # noqa: E731
    return grads_lib.example_gradients(predict, loss, params, x, y, square, chunk)


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=8192)
    parser.add_argument("--n-query", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64, help="examples_per_chunk")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--query-rank", type=int, default=32, help="query_rank of the factored low-rank runs")
    parser.add_argument("--skip-generic", action="store_true", help="leave out the method='generic' references")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-sizes", type=str, default="1024,2048,4096,8192")
    args = parser.parse_args()

    predict, params = mlp(jax.random.key(0))
    loss = losses.softmax_cross_entropy
    train, query = data(jax.random.key(1), args.n_train), data(jax.random.key(2), args.n_query)
    m = sum(a.size for a in jax.tree_util.tree_leaves(params))
    print(f"devices: {jax.devices()}; MLP 784-512-512-10, m = {m:,}; {args.n_train} train x {args.n_query} queries, "
          f"examples_per_chunk = {args.chunk}")

    base = timed(lambda: gradient_norms(predict, loss, args.chunk, params, *train), args.repeats)
    print(f"per-example gradients of {args.n_train} examples: {base:.2f} s")

    runs = {"identity, generic": dict(inverse="identity", method="generic"),
            "identity, factored": dict(inverse="identity")}
    t0 = time.perf_counter()
    op = curvature.GaussNewton(predict, loss, params, (train[0][:1024], train[1][:1024]))
    pre = influence.resolve_inverse("lowrank", predict, loss, params, None, damping=None, curvature_op=op,
                                    rank=args.rank)
    jax.block_until_ready(pre.operands)
    print(f"lowrank: rank-{args.rank} Lanczos eigenpairs of the GGN on 1024 examples + damping "
          f"{pre.damping:.3g} (Hutch++ trace): {time.perf_counter() - t0:.2f} s (once; not in the ratio)")
    lowrank = lambda b: pre.fn(pre.operands, b)[0]  # noqa: E731
    runs["lowrank"] = dict(inverse=lowrank)
    runs[f"lowrank, query_rank {args.query_rank}"] = dict(inverse=lowrank, query_rank=args.query_rank)
    t0 = time.perf_counter()
    ekfac = curvature.EKFAC(predict, loss, params, train)
    jax.block_until_ready(ekfac.decomposition())
    print(f"ekfac: fit on the {args.n_train} training examples: {time.perf_counter() - t0:.2f} s (once; not in the "
          f"ratio)")
    runs["ekfac, generic"] = dict(inverse=ekfac, damping=1e-3, method="generic")
    runs["ekfac"] = dict(inverse=ekfac, damping=1e-3)
    runs[f"ekfac, query_rank {args.query_rank}"] = dict(inverse=ekfac, damping=1e-3, query_rank=args.query_rank)
    scores = {}
    for name, kw in runs.items():
        if args.skip_generic and kw.get("method") == "generic":
            continue
        base = timed(lambda: gradient_norms(predict, loss, args.chunk, params, *train), args.repeats)  # the load
        t = timed(lambda kw=kw: influence.pairwise_scores(predict, loss, params, train, query,  # drifts: re-timed
                                                          examples_per_chunk=args.chunk, **kw), args.repeats)
        scores[name] = influence.pairwise_scores(predict, loss, params, train, query, examples_per_chunk=args.chunk,
                                                 **kw)
        print(f"pairwise {name:22s}: {t:7.2f} s = {t / base:5.2f} x the per-example gradients ({base:.2f} s just "
              f"before)")
    for exact, low in (("identity, generic", "identity, factored"), ("ekfac, generic", "ekfac"),
                       ("lowrank", f"lowrank, query_rank {args.query_rank}"), ("ekfac", f"ekfac, query_rank {args.query_rank}")):
        if exact in scores and low in scores:
            a, b = scores[exact], scores[low]
            rho = [stats.spearmanr(a[:, q], b[:, q]).statistic for q in range(a.shape[1])]
            print(f"{low} vs {exact}: max |difference| / max |score| {np.abs(a - b).max() / np.abs(a).max():.2e}, "
                  f"Spearman per query: mean {np.mean(rho):.4f}, min {np.min(rho):.4f}")

    print("peak resident memory (ru_maxrss of a fresh process running pairwise_scores, identity, 8 queries):")
    for n in (int(v) for v in args.memory_sizes.split(",")):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-rss", str(n), "--chunk",
                              str(args.chunk)], capture_output=True, text=True, check=True)
        print(f"  n_train {n:6d}: {int(out.stdout.split()[-1]) / 2**20:8.1f} MiB")


def peak_rss(n, chunk):
    predict, params = mlp(jax.random.key(0))
    scores = influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, data(jax.random.key(1), n),
                                       data(jax.random.key(2), 8), inverse="identity", examples_per_chunk=chunk,
                                       block_size=1024)
    assert scores.shape == (n, 8)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


if __name__ == "__main__":
    if "--peak-rss" in sys.argv:
        peak_rss(int(sys.argv[sys.argv.index("--peak-rss") + 1]), int(sys.argv[sys.argv.index("--chunk") + 1]))
    else:
        main()
