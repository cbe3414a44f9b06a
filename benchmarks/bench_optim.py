"""Cost of noise injection and speed-up of vmapped sweeps, measured in one run.

    python benchmarks/bench_optim.py [--steps 10] [--repeats 5]

1. Step time with ``noise_injection`` / step time without, full-batch GD on a 2x1024 ReLU MLP with
   1024 examples (64 inputs, 10 outputs), for ``mode="full"`` and ``mode="layerwise"`` (target <= 1.10).
   Timed: one compiled chunk of ``--steps`` steps of ``lsgeo.train`` (lax.scan) plus its evaluation
   (one forward pass), the same loop for both; jit, warm-up, block_until_ready, median of repeats.
2. A vmapped ``lsgeo.train.sweep`` over 8 sigma values vs the 8 runs one after another with
   ``lsgeo.train.train`` (same work, both compiled before timing; target >= 2x faster), layer-wise
   noise, on MLPs from tiny (2x8, 32 examples: one run is all per-step overhead) to the 2x1024 MLP
   (one run already keeps every core busy, so vmapping cannot halve the work).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax

from lsgeo.optim import noise_injection
from lsgeo.train import init_state, sweep, train, train_step


def mlp_params(rng, sizes):
    return {
        f"Dense_{i}": {
            "kernel": (rng.normal(size=(a, b)) * np.sqrt(2.0 / a)).astype(np.float32),
            "bias": np.zeros(b, np.float32),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def mlp_loss(params, batch):
    x, y = batch
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def problem(width, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    return mlp_params(rng, (64, width, width, 10)), (x, y)


def interleaved_times(fns, repeats):
    """Median seconds of each of ``fns`` (a dict of thunks), timed in turn in every round so that a
    machine whose speed drifts (a shared VM) slows all of them alike; also the median per-round
    ratio of each to the first."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # warm-up (compiles)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    first = times[next(iter(fns))]
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(t, first)) for name, t in times.items()}
    return medians, ratios


def train_chunk(optimizer, params, data, steps):
    """``steps`` training steps of ``lsgeo.train.train_step`` under one compiled ``lax.scan``, plus one
    forward pass (the evaluation), the same loop for every optimizer (a thunk)."""

    @jax.jit
    def chunk(state, data):
        state, _ = jax.lax.scan(lambda s, _: train_step(mlp_loss, optimizer, s, data), state, None, length=steps)
        return state, mlp_loss(state.params, data)

    state = init_state(params, optimizer)
    return lambda: chunk(state, data)


def sweep_vs_sequential(width, n, steps, repeats):
    params, data = problem(width, n)
    sigmas = np.linspace(0.0, 0.07, 8)

    def make(sigma, seed):
        return noise_injection(optax.sgd(0.05), sigma, mode="layerwise", seed=seed)

    kw = dict(num_steps=steps, eval_every=steps)
    opts = [make(float(s), 0) for s in sigmas]  # built once, so each run's compilation is cached

    def sequential():
        return [train(mlp_loss, o, params, data, key=0, **kw).history["train_loss"] for o in opts]

    def vmapped():
        return sweep(mlp_loss, make, params, data, {"sigma": sigmas}, [0], **kw).history["train_loss"]

    medians, ratios = interleaved_times({"sequential": sequential, "sweep": vmapped}, repeats)
    return medians["sequential"], medians["sweep"], 1.0 / ratios["sweep"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"devices: {jax.devices()}  (jax {jax.__version__})")

    params, data = problem(1024, 1024)
    chunks = {"plain": train_chunk(optax.sgd(0.05), params, data, args.steps)}
    for mode in ("full", "layerwise"):
        chunks[mode] = train_chunk(noise_injection(optax.sgd(0.05), 0.01, mode=mode), params, data, args.steps)
    medians, ratios = interleaved_times(chunks, args.repeats)
    print(f"[step] 2x1024 ReLU MLP, full-batch GD, n=1024: plain sgd {medians['plain'] / args.steps * 1e3:.1f} ms/step")
    for mode in ("full", "layerwise"):
        print(
            f"[step] noise_injection(mode={mode!r}): {medians[mode] / args.steps * 1e3:.1f} ms/step  "
            f"ratio {ratios[mode]:.3f}  (target <= 1.10; median of per-round ratios)"
        )

    for width, n, steps in ((8, 32, 500), (16, 64, 200), (64, 256, 50), (1024, 1024, args.steps)):
        t_seq, t_sweep, speedup = sweep_vs_sequential(width, n, steps, max(3, args.repeats // 2))
        print(
            f"[sweep] 8 sigmas, 2x{width} MLP, n={n}, {steps} steps: 8 runs one after another {t_seq:.3f} s, "
            f"vmapped sweep {t_sweep:.3f} s, speed-up {speedup:.2f}x  (target >= 2x)"
        )


if __name__ == "__main__":
    main()
