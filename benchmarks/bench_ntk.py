"""Cost of the exact NTK trace and Gauss-Newton trace relative to one full-batch gradient.

    python benchmarks/bench_ntk.py            # the sizes of the targets (a GPU is advisable)
    python benchmarks/bench_ntk.py --small    # a 2-core-CPU-sized smoke run

(1) ``ntk_trace`` of a 2 x 2048 ReLU MLP (input 784, 10 outputs, biases) on 1024 examples;
(2) exact ``gauss_newton_trace`` (softmax cross-entropy, 10 classes) of a 2 x 512 ReLU MLP on
    2048 examples; plus, for reference, per-example squared gradient norms (one cotangent, BackPACK's
    BatchL2Grad) and the 10-probe estimate.
Each is timed under ``jax.jit`` after a warm-up (median of ``--repeats`` runs, ``block_until_ready``)
and divided by the time of one full-batch gradient of the mean cross-entropy on the same batch.
Memory is XLA's compiled estimate (``memory_analysis()``: arguments + outputs + temporaries) of
the whole jitted computation. Targets: ntk_trace <= 30x a gradient and < 4 GB; GN trace <= 30x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from lsgeo import losses, ntk, per_example, risk


def mlp_params(key, sizes):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {"kernel": jax.random.normal(sub, (a, b)) * (2.0 / a) ** 0.5, "bias": jnp.zeros(b)}
    return params


def mlp_predict(params, x):
    names = sorted(params)
    for i, name in enumerate(names):
        x = x @ params[name]["kernel"] + params[name]["bias"]
        if i < len(names) - 1:
            x = jax.nn.relu(x)
    return x


def timed(fn, *args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    mem_bytes = None
    if mem is not None:
        mem_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mem_bytes


def gb(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GB"


def run_case(title, sizes, n, repeats, extra):
    key = jax.random.PRNGKey(0)
    kp, kx, ky = jax.random.split(key, 3)
    params = mlp_params(kp, sizes)
    x = jax.random.normal(kx, (n, sizes[0]))
    y = jax.random.randint(ky, (n,), 0, sizes[-1])
    loss = losses.softmax_cross_entropy

    def grad_fn(p, x, y):
        return jax.grad(lambda q: loss(mlp_predict(q, x), y))(p)

    t_grad, m_grad = timed(grad_fn, params, x, y, repeats=repeats)
    print(f"\n{title}: MLP {'x'.join(map(str, sizes))}, n = {n}, {sum(v.size for v in jax.tree_util.tree_leaves(params))} params")
    print(f"  {'full-batch gradient':44s} {t_grad * 1e3:9.2f} ms   1.00x   mem {gb(m_grad)}")
    for label, fn in extra(params, x, y):
        t, m = timed(fn, params, x, y, repeats=repeats)
        print(f"  {label:44s} {t * 1e3:9.2f} ms  {t / t_grad:5.2f}x   mem {gb(m)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="smaller sizes for a CPU smoke run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--input-dim", type=int, default=784)
    ap.add_argument("--generic-chunk", type=int, default=None, help="examples_per_chunk of the generic path (default: auto)")
    args = ap.parse_args()
    d = args.input_dim
    if args.small:
        case1, n1, case2, n2 = [d, 256, 256, 10], 256, [d, 128, 128, 10], 512
    else:
        case1, n1, case2, n2 = [d, 2048, 2048, 10], 1024, [d, 512, 512, 10], 2048
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), float32")

    def case1_fns(params, x, y):
        return [
            ("ntk_trace, fast (ghost norms)", lambda p, x, y: ntk.ntk_trace(mlp_predict, p, x)),
            ("ntk_trace, generic (per-example VJPs)",
             lambda p, x, y: ntk.ntk_trace(mlp_predict, p, x, method="generic", examples_per_chunk=args.generic_chunk)),
        ]

    def case2_fns(params, x, y):
        ce = losses.softmax_cross_entropy
        return [
            ("gauss_newton_trace exact, fast", lambda p, x, y: risk.gauss_newton_trace(mlp_predict, ce, p, (x, y))),
            ("gauss_newton_trace exact, generic",
             lambda p, x, y: risk.gauss_newton_trace(mlp_predict, ce, p, (x, y), method="generic",
                                                     examples_per_chunk=args.generic_chunk)),
            ("gauss_newton_trace, 10 probes",
             lambda p, x, y: risk.gauss_newton_trace(mlp_predict, ce, p, (x, y), key=jax.random.PRNGKey(0),
                                                     num_probes=10)),
            ("per-example ||grad l_i||^2, fast", lambda p, x, y: per_example.sq_grad_norms(
                mlp_predict, p, x, jax.grad(lambda o: ce(o, y) * x.shape[0])(mlp_predict(p, x)))),
            ("per-example ||grad l_i||^2, generic", lambda p, x, y: per_example.sq_grad_norms(
                mlp_predict, p, x, jax.grad(lambda o: ce(o, y) * x.shape[0])(mlp_predict(p, x)),
                method="generic", examples_per_chunk=args.generic_chunk)),
        ]

    run_case("(1) NTK trace", case1, n1, args.repeats, case1_fns)
    run_case("(2) Gauss-Newton trace, cross-entropy", case2, n2, args.repeats, case2_fns)


if __name__ == "__main__":
    main()
