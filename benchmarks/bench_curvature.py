"""Benchmark of lsgeo.curvature on CPU: the cost of a Hessian-vector product relative to a gradient,
and how many HVPs Lanczos needs for the top of the Hessian spectrum.

    python benchmarks/bench_curvature.py            # about 1-2 minutes on a 2-core CPU

1. HVP time / gradient time (forward-over-reverse, ``lsgeo.curvature.hvp``; target <= 3) on
   (a) a 784-512-512-10 ReLU MLP with softmax cross-entropy over 2048 examples and
   (b) a small CNN (two 3x3 convolutions, 8 and 16 channels, average pooling, dense head) on
       512 28x28 images.
   Both jitted, warmed up, median of several repeats, ``block_until_ready``. Also the amortised cost
   of one HVP inside a short Lanczos run (``top_eigenvalues``: one forward-over-reverse product per
   step inside a ``while_loop``; the figure includes the reorthogonalisation, spread over 5 steps).
2. Top-5 eigenvalues with ``top_eigenvalues`` at 40 and 60 Lanczos steps (= HVPs) from three random
   starts against a converged reference (a 150-step float64 Lanczos run, itself checked against a
   120-step run from another start) on a 64-128-128-10 tanh MLP (~26k parameters) with
   cross-entropy on 1024 examples from a 10-class Gaussian mixture.
3. Operators (``lsgeo.curvature.Hessian`` / ``GaussNewton``): 8 products at once (``op @ U``, one
   linearisation per microbatch, 8 tangents vmapped; target >= 1.5x) against 8 single products
   (``op @ u`` eight times), on the MLP and the CNN; a 64-probe Hutchinson trace through batched
   products (``vectors_per_pass=None``: the memory budget's choice) against one probe per pass.
4. Per-block spectral densities of all top-level blocks of a ResNet-18 (width 16, 32 images), each
   block on its own (``curvature.blocks``: restricted products, one program per block) and all blocks
   in one program (``curvature.block_slq_nodes``), against one full-model density with the same SLQ
   settings (target <= 1.5x).
   Skip with ``--no-resnet``.

Timings are interleaved round by round (a change in the machine's load hits both sides of a ratio)
and the median of the per-round ratios is printed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsgeo import curvature, losses, models


def median_time(fn, *args, repeats=7):
    """Median wall time of ``fn(*args)`` over ``repeats`` calls after one warm-up (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mixture(seed, n, shape, num_classes=10):
    """Inputs from a Gaussian mixture with one random mean per class, integer labels."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    means = rng.standard_normal((num_classes, d))
    y = rng.integers(0, num_classes, size=n)
    x = means[y] + 1.5 * rng.standard_normal((n, d))
    return x.reshape((n, *shape)).astype(np.float32), y.astype(np.int32)


def mlp_init(seed, sizes, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        {"w": (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(dtype), "b": np.zeros(b, dtype)}
        for a, b in zip(sizes[:-1], sizes[1:])
    ]


def mlp_apply(params, x, act=jax.nn.relu):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = act(x)
    return x


def cnn_init(seed):
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1": {"w": he((3, 3, 1, 8), 9), "b": np.zeros(8, np.float32)},
        "conv2": {"w": he((3, 3, 8, 16), 72), "b": np.zeros(16, np.float32)},
        "dense": {"w": he((7 * 7 * 16, 10), 784), "b": np.zeros(10, np.float32)},
    }


def cnn_apply(params, x):  # x: [n, 28, 28, 1]
    def conv(h, p):
        h = jax.lax.conv_general_dilated(h, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + p["b"])
        return jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0

    h = conv(conv(x, params["conv1"]), params["conv2"])
    return h.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"]


def objective(predict):
    def f(params, batch):
        x, y = batch
        return losses.softmax_cross_entropy(predict(params, x), y)

    return f


def bench_hvp(name, f, params, batch, repeats):
    grad = jax.jit(jax.grad(f))
    hvp = jax.jit(lambda p, b, v: curvature.hvp(f, p, b, v))
    v = optax.tree.random_like(jax.random.key(0), params, jax.random.normal)
    t_grad = median_time(grad, params, batch, repeats=repeats)
    t_hvp = median_time(hvp, params, batch, v, repeats=repeats)
    # amortised HVP inside Lanczos: top_eigenvalues with K steps, one product per step
    steps = 5
    lanczos = jax.jit(lambda p, b, k: curvature.top_eigenvalues(f, p, b, k, k=1, num_iters=steps))
    t_lanczos = median_time(lanczos, params, batch, jax.random.key(1), repeats=max(2, repeats // 2))
    m = optax.tree.size(params)
    print(
        f"{name:<34} m={m:>7}  grad {1e3 * t_grad:7.1f} ms  hvp {1e3 * t_hvp:7.1f} ms  "
        f"HVP/grad = {t_hvp / t_grad:4.2f}  (in Lanczos, per HVP: {t_lanczos / steps / t_grad:4.2f} x grad)"
    )
    return t_hvp / t_grad


def bench_top_eigenvalues():
    with jax.enable_x64(True):
        x, y = mixture(1, 1024, (64,))
        params = mlp_init(2, (64, 128, 128, 10), dtype=np.float64)
        batch = (x.astype(np.float64), y)
        f = objective(lambda p, x: mlp_apply(p, x, act=jnp.tanh))
        m = optax.tree.size(params)
        key = jax.random.key(3)
        t0 = time.perf_counter()
        ref = np.asarray(curvature.top_eigenvalues(f, params, batch, key, k=5, num_iters=150))
        ref_250 = np.asarray(curvature.top_eigenvalues(f, params, batch, jax.random.key(4), k=5, num_iters=120))
        t_ref = time.perf_counter() - t0
        print(
            f"\nTop-5 Hessian eigenvalues, 64-128-128-10 tanh MLP, m={m}, n=1024, float64\n"
            f"  reference: 150-step Lanczos {np.array2string(ref, precision=6)}; "
            f"max rel. change vs a 120-step run from another start {np.max(np.abs(ref_250 - ref) / np.abs(ref)):.1e}"
            f" ({t_ref:.1f} s)"
        )
        for steps in (40, 60):
            for seed in (5, 6, 7):
                top = np.asarray(curvature.top_eigenvalues(f, params, batch, jax.random.key(seed), k=5, num_iters=steps))
                rel = np.abs(top - ref) / np.abs(ref)
                print(
                    f"  {steps:>3} HVPs (seed {seed}): max rel. error {rel.max():.1e}  "
                    f"per eigenvalue {np.array2string(rel, precision=1, floatmode='fixed', formatter={'float': lambda e: f'{e:.0e}'})}"
                )
    return ref


def interleaved(fns, repeats):
    """Per-function median times and the medians of the per-round ratios to the first function: every
    function is compiled, then each round calls each of them once."""
    for fn in fns:
        jax.block_until_ready(fn())
    rounds = []
    for _ in range(repeats):
        times = []
        for fn in fns:
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        rounds.append(times)
    medians = [statistics.median(r[i] for r in rounds) for i in range(len(fns))]
    ratios = [statistics.median(r[i] / r[0] for r in rounds) for i in range(len(fns))]
    return medians, ratios


def bench_batched_products(name, op, repeats):
    u = np.asarray(jax.random.normal(jax.random.key(0), (8, op.size), jnp.float32))
    (t_batched, t_singles), (_, ratio) = interleaved(
        [lambda: op @ u, lambda: [op @ row for row in u]], repeats
    )
    print(f"  {name:<40} 8 at once {1e3 * t_batched:8.1f} ms   8 single {1e3 * t_singles:8.1f} ms   "
          f"speed-up {ratio:4.2f}x")
    return ratio


def bench_trace_batching(name, op, repeats):
    key = jax.random.key(1)
    auto = curvature.chunking.auto_vectors_per_pass(op, 64)
    (t_auto, t_one), (_, ratio) = interleaved([
        lambda: curvature.hessian_trace(op, key, num_probes=64),
        lambda: curvature.hessian_trace(op, key, num_probes=64, vectors_per_pass=1),
    ], repeats)
    print(f"  {name:<40} 64 probes, {auto} per pass {t_auto:6.2f} s   one per pass {t_one:6.2f} s   "
          f"speed-up {ratio:4.2f}x")
    return ratio


def bench_block_densities(repeats):
    model = models.ResNet18(width=16)
    params, state = models.init_model(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    predict = models.make_predict(model, state)
    kx, ky = jax.random.split(jax.random.key(1))
    batch = (jax.random.normal(kx, (32, 32, 32, 3), jnp.float32), jax.random.randint(ky, (32,), 0, 10))
    op = curvature.Hessian(objective(predict), params, batch)
    parts = curvature.blocks(op)
    key, settings = jax.random.key(2), {"num_iters": 10, "num_runs": 1}
    t0 = time.perf_counter()
    jax.block_until_ready(curvature.spectral_density(op, key, **settings))
    first_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready({g: curvature.spectral_density(b, key, **settings) for g, b in parts.items()})
    first_blocks = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(curvature.block_slq_nodes(op, key, **settings))
    first_together = time.perf_counter() - t0
    (t_full, t_blocks, t_together), (_, ratio, ratio_together) = interleaved([
        lambda: curvature.spectral_density(op, key, **settings),
        lambda: {g: curvature.spectral_density(b, key, **settings) for g, b in parts.items()},
        lambda: curvature.block_slq_nodes(op, key, **settings),
    ], repeats)
    print(f"\nPer-block densities, ResNet-18 width 16 (m={op.size}), {len(parts)} blocks, 32 images, SLQ "
          f"10 steps x 1 run:\n  full model {t_full:6.2f} s (first call {first_full:.1f} s)\n  every block "
          f"on its own (blocks(op), restricted products) {t_blocks:6.2f} s (first calls {first_blocks:.1f} s): "
          f"/ full = {ratio:4.2f} (first calls {first_blocks / first_full:.2f})\n  all blocks in one program "
          f"(block_slq_nodes, masked products vmapped) {t_together:6.2f} s (first call {first_together:.1f} s): "
          f"/ full = {ratio_together:4.2f} (first calls {first_together / first_full:.2f})")
    return ratio


def main():
    t_start = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores visible")
    print("HVP / gradient time (jit, warm-up, median of repeats):")
    x, y = mixture(0, 2048, (784,))
    mlp_params = mlp_init(0, (784, 512, 512, 10))
    bench_hvp("MLP 784-512-512-10 ReLU, n=2048", objective(mlp_apply), mlp_params, (x, y), 7)
    x_img, y_img = x[:512].reshape(512, 28, 28, 1), y[:512]
    bench_hvp("CNN conv8-conv16-dense, n=512", objective(cnn_apply), cnn_init(0), (x_img, y_img), 5)
    bench_top_eigenvalues()
    print("\nOperators: 8 products at once vs 8 single products (interleaved rounds, median ratio):")
    mlp = curvature.Hessian(objective(mlp_apply), mlp_params, (x, y))
    cnn = curvature.Hessian(objective(cnn_apply), cnn_init(0), (x_img, y_img))
    gn = curvature.GaussNewton(mlp_apply, losses.softmax_cross_entropy, mlp_params, (x, y))
    bench_batched_products("Hessian, MLP, n=2048", mlp, 5)
    bench_batched_products("Hessian, CNN, n=512", cnn, 5)
    bench_batched_products("Gauss-Newton, MLP, n=2048", gn, 5)
    print("64-probe Hutchinson trace, batched products vs one probe per pass:")
    bench_trace_batching("Hessian, MLP, n=2048", mlp, 3)
    bench_trace_batching("Hessian, CNN, n=512", cnn, 3)
    if "--no-resnet" not in sys.argv:
        bench_block_densities(3)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
