"""Streaming a data set from the host against in-memory microbatches: the cost of reading each batch
through a host callback on every product.

    python benchmarks/bench_stream.py                  # ResNet-18 width 16, 512 CIFAR-shaped images, batches of 128
    python benchmarks/bench_stream.py --n 2048 --batch 256

The same Hessian-vector product of ``lsgeo.models.ResNet18`` (BatchNorm in evaluation mode) over the same
images, (a) from ``curvature.Hessian(f, params, (x, y), microbatch_size=B)`` (the batch on the device,
microbatches sliced in a ``lax.scan``) and (b) from ``curvature.Hessian(f, params, source)`` with a
source reading the images from a numpy memmap on disk, ``B`` at a time (``lax.fori_loop`` fetching each
batch by ``jax.pure_callback``). Both compiled; then interleaved rounds time one product of each, and the
median of the per-round ratios is printed (target: streamed / in memory <= 1.3 on CPU), next to the
agreement of the two products.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import curvature, losses, models


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = models.ResNet18(width=args.width)
    params, state = models.init_model(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    predict = models.make_predict(model, state)

    def f(p, batch):
        x, y = batch
        return losses.softmax_cross_entropy(predict(p, x), y)

    rng = np.random.default_rng(1)
    folder = tempfile.mkdtemp()
    np.save(os.path.join(folder, "x.npy"), rng.standard_normal((args.n, 32, 32, 3)).astype(np.float32))
    np.save(os.path.join(folder, "y.npy"), rng.integers(0, 10, size=args.n).astype(np.int32))
    x = np.load(os.path.join(folder, "x.npy"), mmap_mode="r")
    y = np.load(os.path.join(folder, "y.npy"), mmap_mode="r")

    def source():
        for start in range(0, args.n, args.batch):
            yield np.asarray(x[start : start + args.batch]), np.asarray(y[start : start + args.batch])

    in_memory = curvature.Hessian(f, params, (jnp.asarray(x), jnp.asarray(y)), microbatch_size=args.batch)
    streamed = curvature.Hessian(f, params, source)
    u = np.asarray(jax.random.normal(jax.random.key(2), (in_memory.size,), jnp.float32))
    t0 = time.perf_counter()
    a = np.asarray(in_memory @ u)
    first_memory = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = np.asarray(streamed @ u)
    first_stream = time.perf_counter() - t0
    rounds = []
    for _ in range(args.repeats):
        times = []
        for op in (in_memory, streamed):
            t0 = time.perf_counter()
            jax.block_until_ready(op @ u)
            times.append(time.perf_counter() - t0)
        rounds.append(times)
    t_memory = statistics.median(r[0] for r in rounds)
    t_stream = statistics.median(r[1] for r in rounds)
    ratio = statistics.median(r[1] / r[0] for r in rounds)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores visible")
    print(f"ResNet-18 width {args.width} (m={in_memory.size}), {args.n} images, batches of {args.batch}; "
          f"one HVP over the data set, median of {args.repeats} interleaved rounds:")
    print(f"  in-memory microbatches {t_memory:7.2f} s (first call {first_memory:.1f} s)")
    print(f"  streamed from a memmap {t_stream:7.2f} s (first call {first_stream:.1f} s)")
    print(f"  streamed / in memory = {ratio:.2f}   max relative difference of the products "
          f"{np.max(np.abs(a - b)) / np.max(np.abs(a)):.1e}")


if __name__ == "__main__":
    main()
