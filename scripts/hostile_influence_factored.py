"""A hostile pass over the factored route of lsgeo.influence (``method="fast"``, ``query_rank``).

    PYTHONPATH=. python scripts/hostile_influence_factored.py

Every try is judged against an independent answer: the generic route (every gradient formed, ``method="generic"``)
for what must be exact, the truncated SVD of each kernel's preconditioned query (numpy) for ``query_rank``, or a
ValueError naming the argument for what the function does not handle. Printed: each failure, then the tally
``{"tries", "clean", "obscure" (an error that does not name the argument), "wrong" (a number that differs, or a
result where an error was due)}``.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import influence, losses

jax.config.update("jax_enable_x64", True)


def mlp(sizes, dtype, act=jnp.tanh):
    k = jax.random.split(jax.random.key(0), 2 * len(sizes))
    params = {f"Dense_{i}": {"kernel": (jax.random.normal(k[2 * i], (a, b)) / np.sqrt(a)).astype(dtype),
                             "bias": (0.1 * jax.random.normal(k[2 * i + 1], (b,))).astype(dtype)}
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

    def predict(p, x):
        for i in range(len(sizes) - 1):
            x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            x = act(x) if i < len(sizes) - 2 else x
        return x

    return predict, params


def cnn(dtype):
    k = jax.random.split(jax.random.key(1), 3)
    params = {"conv": (jax.random.normal(k[0], (3, 3, 1, 4)) / 3).astype(dtype),
              "dense": (jax.random.normal(k[1], (4 * 6 * 6, 3)) / 12).astype(dtype)}

    def predict(p, x):
        h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).reshape(x.shape[0], -1) @ p["dense"]

    return predict, params


def sequence(dtype, positions):
    k = jax.random.split(jax.random.key(2), 2)
    params = {"w": (jax.random.normal(k[0], (10, 12)) / 3).astype(dtype),
              "head": (jax.random.normal(k[1], (12, 3)) / 3).astype(dtype)}

    def predict(p, x):
        return jnp.tanh(x @ p["w"]).mean(axis=1) @ p["head"]

    return predict, params


def data(shape, n, k=3, dtype=jnp.float64, seed=3):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n,) + shape).astype(dtype), jax.random.randint(ky, (n,), 0, k)


def main():
    tally = {"tries": 0, "clean": 0, "obscure": 0, "wrong": 0}

    def record(label, status, detail=""):
        tally["tries"] += 1
        tally[status] += 1
        if status != "clean":
            print(f"{status}: {label} {detail}")

    def exact(label, predict, params, train, query, rtol, **kw):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, train, query,
                                                method="fast", **kw)
                want = influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, train, query,
                                                 method="generic", **{k: v for k, v in kw.items() if k != "query_rank"})
        except Exception as err:  # noqa: BLE001
            record(label, "obscure", f"{type(err).__name__}: {err}"[:200])
            return
        scale = max(np.abs(want).max(), 1e-30)
        ok = got.shape == want.shape and got.dtype == want.dtype and np.abs(got - want).max() <= rtol * scale
        record(label, "clean" if ok else "wrong", f"max diff {np.abs(got - want).max() / scale:.2e}, dtypes "
                                                  f"{got.dtype} / {want.dtype}" if got.shape == want.shape else
               f"shapes {got.shape} / {want.shape}")

    def refused(label, name, predict, params, train, query, **kw):
        try:
            influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, train, query, **kw)
        except ValueError as err:
            record(label, "clean" if name in str(err) else "obscure", str(err)[:200])
            return
        except Exception as err:  # noqa: BLE001
            record(label, "obscure", f"{type(err).__name__}: {err}"[:200])
            return
        record(label, "wrong", "no error")

    for dtype, rtol in ((jnp.float64, 1e-11), (jnp.float32, 2e-5)):
        predict, params = mlp((8, 6, 5, 3), dtype)
        train, query = data((8,), 13, dtype=dtype), data((8,), 4, dtype=dtype, seed=4)
        for n_train, n_query in ((1, 1), (13, 1), (1, 4), (13, 4)):
            tr = jax.tree_util.tree_map(lambda a: a[:n_train], train)
            q = jax.tree_util.tree_map(lambda a: a[:n_query], query)
            for chunk in (None, 1, 5, 64):
                exact(f"mlp {dtype.__name__} n {n_train} x {n_query} chunk {chunk}", predict, params, tr, q, rtol,
                      inverse="identity", examples_per_chunk=chunk)
        # query_rank at or above every kernel's rank: the dense terms are kept, exact
        for rank in (6, 7, 1000):
            exact(f"mlp {dtype.__name__} ekfac query_rank {rank}", predict, params, train, query, rtol,
                  inverse="ekfac", damping=0.1, query_rank=rank)
        for by_group in (True,):
            got = influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, train, query,
                                            inverse="identity", by_group=by_group)
            want = influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, train, query,
                                             inverse="identity", by_group=by_group, method="generic")
            bad = [k for k in want if np.abs(got[k] - want[k]).max() > rtol * np.abs(want[k]).max()]
            record(f"by_group {dtype.__name__}", "wrong" if bad or list(got) != list(want) else "clean", str(bad))
        # ReLU (kinks), the integer-label loss on a source with an uneven last batch
        relu_predict, relu_params = mlp((8, 6, 3), dtype, jax.nn.relu)

        def source():
            for s in range(0, 13, 5):
                yield train[0][s:s + 5], train[1][s:s + 5]

        exact(f"relu source {dtype.__name__}", relu_predict, relu_params, source, query, rtol, inverse="identity")
        exact(f"cnn {dtype.__name__}", *cnn(dtype), data((8, 8, 1), 7, dtype=dtype), data((8, 8, 1), 3, dtype=dtype),
              rtol, inverse="identity")
        for positions in (1, 2, 5):
            for inverse in ("identity", "ekfac"):
                kw = dict(inverse=inverse) if inverse == "identity" else dict(inverse=inverse, damping=0.1)
                exact(f"sequence T={positions} {inverse} {dtype.__name__}", *sequence(dtype, positions),
                      data((positions, 10), 7, dtype=dtype), data((positions, 10), 3, dtype=dtype), rtol, **kw)
        # whole preconditioned queries on the factored route (one GEMM per chunk): every inverse by name
        for inverse in ("kfac", "ekfac", "cg", "lowrank"):
            exact(f"mlp {dtype.__name__} {inverse} whole queries", predict, params, train, query, rtol,
                  inverse=inverse, damping=0.1, **({"rank": 8} if inverse == "lowrank" else {}))
    # query_rank below the rank: against the numpy truncated SVD of each kernel's preconditioned query
    predict, params = mlp((24, 16, 3), jnp.float64)
    train, query = data((24,), 9), data((24,), 3, seed=5)
    scale = jax.tree_util.tree_map(lambda a: 1.0 + jnp.abs(jnp.cos(jnp.arange(a.size).reshape(a.shape))), params)
    inverse = lambda b: jax.tree_util.tree_map(jnp.multiply, scale, b)  # noqa: E731
    grads = [jax.grad(lambda p: losses.softmax_cross_entropy(predict(p, query[0][i:i + 1]), query[1][i:i + 1]))(params)
             for i in range(3)]
    train_grads = [jax.grad(lambda p: losses.softmax_cross_entropy(predict(p, train[0][i:i + 1]),
                                                                   train[1][i:i + 1]))(params) for i in range(9)]
    for rank in (1, 2, 3, 5):
        want = np.zeros((9, 3))
        for q, g in enumerate(grads):
            pq = inverse(g)
            for name in ("Dense_0", "Dense_1"):
                m = np.asarray(pq[name]["kernel"])
                u, s, vt = np.linalg.svd(m, full_matrices=False)
                cheaper = rank * (m.shape[0] + m.shape[1]) < m.size
                mk = (u[:, :rank] * s[:rank]) @ vt[:rank] if cheaper else m
                for i, gi in enumerate(train_grads):
                    want[i, q] += np.sum(mk * np.asarray(gi[name]["kernel"])) + np.sum(
                        np.asarray(pq[name]["bias"]) * np.asarray(gi[name]["bias"]))
        got = influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, train, query, inverse=inverse,
                                        query_rank=rank)
        err = np.abs(got - want).max() / np.abs(want).max()
        record(f"query_rank {rank} vs numpy SVD", "clean" if err < 1e-6 else "wrong", f"{err:.2e}")
    # what must be refused
    predict, params = mlp((8, 6, 3), jnp.float64)
    train, query = data((8,), 5), data((8,), 2)
    for value in (0, -1, 2.5, "3", True, np.float64(2.0)):
        refused(f"query_rank={value!r}", "query_rank", predict, params, train, query, inverse="identity",
                query_rank=value)
    for value in ("ghost", None, 1, "FAST"):
        refused(f"method={value!r}", "method", predict, params, train, query, inverse="identity", method=value)
    refused("query with another feature size", "query_data", predict, params, train, data((9,), 2),
            inverse="identity")
    refused("empty query set", "query_data", predict, params, train, (query[0][:0], query[1][:0]), inverse="identity")
    print(json.dumps(tally))


if __name__ == "__main__":
    main()
