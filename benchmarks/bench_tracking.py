"""Benchmark of curvature tracking along a training run: the warm-started tracker inside the compiled loop
against cold Lanczos calls at the same iterates.

    python benchmarks/bench_tracking.py                  # about a minute on a 2-core CPU
    python benchmarks/bench_tracking.py --steps 400 --every 10 --tol 1e-4 --rounds 3

A run of ``--steps`` full-batch GD steps (a 64-32-32-10 ReLU MLP, squared loss on one-hot targets, 512
scikit-learn digits; ``lsgeo.models.MLP``, 3466 parameters) with lambda_max measured every ``--every`` steps
(and at the start), in two ways:

- tracked: ``lsgeo.train.train(..., measure=top_eigenvalue_tracker(f, num_iters, tol), measure_every)``,
  Lanczos inside the compiled loop, warm-started from the previous measurement's Ritz vector;
- cold: the same run without a measurement (``train(..., eval_every=every)``), plus one cold
  ``lsgeo.curvature.top_eigenvalues(f, params, batch, key, num_iters=num_iters, tol=tol)`` (jitted once) at each
  of the same iterates (gathered beforehand, untimed, by resuming the run every ``--every`` steps): the
  measurements' own cost, without what it takes to get the iterates;
- cold calls with ``top_eigenvalues``' defaults (``num_iters`` 40, no ``tol``): what a call without options runs;
- stop and go: what a loop without a tracker does (the edge-of-stability scripts' ``--eig_freq``): train
  ``--every`` steps, call the cold ``top_eigenvalues``, resume, and so on.

Both use the same Lanczos cap and relative-residual tolerance, so the difference is the start: the
products per measurement are printed for both (the cold count is that of the tracker from a fresh state, the
same algorithm and start as ``top_eigenvalues``). Each side is timed on its first call (compilation included:
one compiled chunk for the tracked run; the plain run's chunk plus ``top_eigenvalues`` for the cold side) and
warm (compiled, ``--rounds`` interleaved rounds, median). Printed: the times, their ratios (cold / tracked,
target >= 2 warm), the agreement of the two lambda_max series and the products. No assertions.
Public API only.

What bounds the ratio: the run itself (200 gradient steps cost about as much as 21 cold measurements here), and
the warm start's saving, which is logarithmic in the start's angle to the new top eigenvector: at the edge of
stability (``--lr 0.3``) that vector turns by 15-25 degrees in 10 steps, in stable GD (``--lr 0.1``) by ~3.
Measured on a 2-core CPU (shared): products 197 vs 273 (1.39x) at lr 0.3 and 112 vs 210 (1.88x) at lr 0.1;
time 1.04x and 1.40x warm, 0.84x and 0.85x on the first call (the tracked run compiles its measurement
program, the cold side ``top_eigenvalues``: about the same).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsgeo import curvature, losses, models, train
from lsgeo.data import load_dataset


def problem(n: int):
    """``(objective, params, batch)``; a new objective function per call (its own compilations)."""
    ds = load_dataset("digits", n_train=n, seed=0, standardize=False)
    x, y = jnp.asarray(ds.x_train, jnp.float32), jax.nn.one_hot(ds.y_train, 10)
    model = models.MLP(widths=(32, 32), num_outputs=10, activation="relu")
    params = model.init(jax.random.key(0), x[:1], train=False)["params"]

    def objective(params, batch):
        return losses.squared_loss(model.apply({"params": params}, batch[0], train=False), batch[1])

    return objective, params, (x, y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="measure lambda_max every this many steps")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--n", type=int, default=512, help="training examples")
    parser.add_argument("--num-iters", type=int, default=40, help="Lanczos cap per measurement (both sides)")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance (both sides; the "
                        "tracker's default)")
    parser.add_argument("--rounds", type=int, default=3, help="warm timing rounds (interleaved)")
    args = parser.parse_args(argv)

    f, params, batch = problem(args.n)
    g = problem(args.n)[0]  # the same objective for the cold side, another function: no compilation is shared
    m = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    opt = optax.sgd(args.lr)
    tracker = train.top_eigenvalue_tracker(f, k=1, num_iters=args.num_iters, tol=args.tol)
    key = jax.random.key(0)
    cold_top = jax.jit(lambda p, b: curvature.top_eigenvalues(g, p, b, key, k=1, num_iters=args.num_iters,
                                                              tol=args.tol)[0])
    print(f"{jax.devices()[0].platform}: GD lr={args.lr}, {args.steps} steps, lambda_max every {args.every} "
          f"(Lanczos cap {args.num_iters}, tol {args.tol:g}); MLP 64-32-32-10, m={m}, n={args.n} digits")

    # the iterates of the run (untimed; a third objective function, so that neither side finds its programs
    # compiled): resume every `every` steps
    h = problem(args.n)[0]
    iterates, state = [params], None
    for _ in range(args.steps // args.every):
        result = train.train(h, opt, params if state is None else state, batch, num_steps=args.every)
        iterates.append(result.params)
        state = result.state
    # one-off costs of the process (XLA and its kernels' first compilations) on neither side: both paths once on h
    train.train(h, opt, params, batch, num_steps=args.every, measure=train.top_eigenvalue_tracker(h, tol=args.tol))
    jax.block_until_ready(curvature.top_eigenvalues(h, params, batch, key, tol=args.tol))

    def tracked():
        result = train.train(f, opt, params, batch, num_steps=args.steps, eval_every=args.every, measure=tracker)
        return result.history["lambda_max"], result.history["lambda_max_products"], result.params

    def cold():
        result = train.train(g, opt, params, batch, num_steps=args.steps, eval_every=args.every)
        values = [cold_top(p, batch) for p in iterates]
        return np.asarray(jax.block_until_ready(values)), result.params

    default_top = jax.jit(lambda p, b: curvature.top_eigenvalues(g, p, b, key)[0])  # the documented defaults

    def cold_default():  # the same, with top_eigenvalues as called without options (40 steps, no early stop)
        result = train.train(g, opt, params, batch, num_steps=args.steps, eval_every=args.every)
        values = [default_top(p, batch) for p in iterates]
        return np.asarray(jax.block_until_ready(values)), result.params

    def stop_and_go():  # the loop researchers write today: stop every `every` steps, measure, start again
        values, state = [cold_top(params, batch)], None
        for _ in range(args.steps // args.every):
            result = train.train(g, opt, params if state is None else state, batch, num_steps=args.every)
            values.append(cold_top(result.params, batch))
            state = result.state
        return np.asarray(jax.block_until_ready(values)), result.params

    def timed(fn):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        return time.perf_counter() - t0, out

    first_tracked, (lam_tracked, products, end_tracked) = timed(tracked)
    first_cold, (lam_cold, end_cold) = timed(cold)
    first_stop, (lam_stop, _) = timed(stop_and_go)
    _, (lam_default, _) = timed(cold_default)  # compiles default_top
    warm_tracked, warm_cold, warm_stop, warm_default = [], [], [], []
    for _ in range(args.rounds):  # interleaved: a change in load hits every side
        warm_tracked.append(timed(tracked)[0])
        warm_cold.append(timed(cold)[0])
        warm_stop.append(timed(stop_and_go)[0])
        warm_default.append(timed(cold_default)[0])
    warm_tracked, warm_cold = statistics.median(warm_tracked), statistics.median(warm_cold)
    warm_stop, warm_default = statistics.median(warm_stop), statistics.median(warm_default)

    cold_products = [int(tracker.update(p, batch, tracker.init(p))[0]["lambda_max_products"]) for p in iterates]
    same_run = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree_util.tree_leaves(end_tracked), jax.tree_util.tree_leaves(end_cold)))
    rel = np.abs(lam_tracked - lam_cold) / np.abs(lam_cold)
    k = len(iterates)
    print(f"measurements per run: {k}; final parameters of both runs differ by {same_run:.1e} (tracking does "
          f"not change training)")
    print(f"lambda_max: start {lam_cold[0]:.4g}, end {lam_cold[-1]:.4g} (2/lr = {2 / args.lr:.4g}); tracked vs "
          f"cold: max relative difference {rel.max():.1e}")
    print(f"Lanczos products per measurement: tracked (warm) median {np.median(products[1:]):.0f} "
          f"(first {int(products[0])}, total {int(products.sum())}), cold median {np.median(cold_products):.0f} "
          f"(total {sum(cold_products)}); ratio of totals {sum(cold_products) / products.sum():.2f}x")
    print(f"first call (compile included): tracked {first_tracked:.2f} s, run + cold calls {first_cold:.2f} s, "
          f"ratio {first_cold / first_tracked:.2f}x")
    print(f"warm (compiled, median of {args.rounds}): tracked {warm_tracked:.3f} s, run + cold calls "
          f"{warm_cold:.3f} s, ratio {warm_cold / warm_tracked:.2f}x (target >= 2)")
    print(f"stop and go (train {args.every} steps, cold top_eigenvalues, resume; the loop without a tracker): "
          f"first call {first_stop:.2f} s, warm {warm_stop:.3f} s, ratio to tracked {warm_stop / warm_tracked:.2f}x; "
          f"lambda_max max relative difference to the cold series "
          f"{float(np.max(np.abs(lam_stop - lam_cold) / np.abs(lam_cold))):.1e}")
    print(f"cold calls with top_eigenvalues' defaults (40 Lanczos steps, no early stop; {40 * k} products): warm "
          f"{warm_default:.3f} s, ratio to tracked {warm_default / warm_tracked:.2f}x; lambda_max max relative "
          f"difference to the tol-{args.tol:g} series {float(np.max(np.abs(lam_default - lam_cold) / np.abs(lam_cold))):.1e}")


if __name__ == "__main__":
    main()
