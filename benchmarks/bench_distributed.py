"""Two processes with one device each against one process with two devices: the same data-set-level work,
the data sharded the same way, through ``jax.distributed`` (gloo CPU collectives) or within one process.

    python benchmarks/bench_distributed.py                 # MLP 64-512-512-10, 8192 examples
    python benchmarks/bench_distributed.py --n 32768 --width 1024

Each layout runs the same worker (a subprocess; 2 processes through ``python -m lsgeo.launch``, or 1 process
with 2 forced host devices): the examples are a global ``jax.Array`` sharded along the example axis over the
2 devices (``jax.make_array_from_process_local_data``: each process builds only its half), then it times, after
one compiling call, (a) a Hessian-vector product over the whole data set (``curvature.Hessian``, microbatches
of ``--microbatch`` per device), (b) the top eigenvalue (``top_eigenvalues``, 20 Lanczos steps) and (c) 50
full-batch GD steps (``lsgeo.train.train``, data parallel). It prints the median of ``--repeats`` for each in
both layouts and their ratio (target: 2 processes / 1 process within 1.5x), and the agreement of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def worker(args):
    from lsgeo import launch

    launch.initialize()
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lsgeo import curvature, losses, models, train

    rank, count = jax.process_index(), jax.process_count()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=args.n).astype(np.int32)
    model = models.MLP(widths=(args.width, args.width), num_outputs=10)
    params = model.init(jax.random.key(0), x[:1])["params"]
    predict = lambda p, xb: model.apply({"params": p}, xb)  # noqa: E731
    f = lambda p, b: losses.softmax_cross_entropy(predict(p, b[0]), b[1])  # noqa: E731
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec("data"))
    mine = slice(rank * args.n // count, (rank + 1) * args.n // count)
    batch = tuple(jax.make_array_from_process_local_data(sharding, a[mine]) for a in (x, y))
    op = curvature.Hessian(f, params, batch, microbatch_size=args.microbatch)
    u = np.asarray(jax.random.normal(jax.random.key(1), (op.size,), np.float32))
    key = jax.random.key(2)

    def product():
        return np.asarray((op @ u).addressable_data(0))

    def top():
        return np.asarray(curvature.top_eigenvalues(op, key, num_iters=20).addressable_data(0))

    def gd():
        result = train.train(f, optax.sgd(0.1), params, batch, num_steps=50, eval_every=50)
        return result.history["train_loss"]

    times, values = {}, {}
    for name, fn in (("hvp", product), ("top_eigenvalue", top), ("gd_50_steps", gd)):
        values[name] = np.ravel(fn()).astype(float)[:8].tolist()  # the compiling call
        rounds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            rounds.append(time.perf_counter() - t0)
        times[name] = statistics.median(rounds)
    if rank == 0:
        print(json.dumps({"processes": count, "devices": jax.device_count(), "times": times, "values": values}))
    if count > 1:
        jax.distributed.shutdown()


def run_layout(args, processes: int) -> dict:
    options = {"n": args.n, "width": args.width, "microbatch": args.microbatch, "repeats": args.repeats}
    me = [sys.executable, os.path.abspath(__file__), "--worker", *(w for k, v in options.items() for w in (f"--{k}", str(v)))]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    if processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        command = me
    else:
        command = [sys.executable, "-m", "lsgeo.launch", "--num-processes", "2", "--devices-per-process", "1",
                   "--timeout", "1200", "--", *me]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--microbatch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    one, two = run_layout(args, 1), run_layout(args, 2)
    print(f"n={args.n}, MLP 64-{args.width}-{args.width}-10, microbatches of {args.microbatch} per device; "
          f"median of {args.repeats}")
    print(f"{'':16s} {'1 proc x 2 dev':>15s} {'2 proc x 1 dev':>15s} {'ratio':>7s} {'max rel diff':>13s}")
    for name in one["times"]:
        a, b = one["values"][name], two["values"][name]
        diff = max(abs(p - q) / max(abs(q), 1e-30) for p, q in zip(a, b))
        print(f"{name:16s} {one['times'][name]:14.4f}s {two['times'][name]:14.4f}s "
              f"{two['times'][name] / one['times'][name]:7.2f} {diff:13.2e}")


if __name__ == "__main__":
    main()
