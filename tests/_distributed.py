"""Run by tests/test_launch.py under ``python -m lsgeo.launch --num-processes 2 --devices-per-process 2``: each
process holds half of the data as its shard of a global jax.Array (jax.make_array_from_process_local_data);
curvature operators and lsgeo.train use it where it lies. Prints one JSON line per process: the relative
differences of a Hessian product, a Gauss-Newton product, the top eigenvalues, a Hutchinson trace (same key),
KFAC and EKFAC products and damped-inverse products,
20 steps of data-parallel training (full-batch GD and minibatch SGD: the losses along the run and the final
parameters; lambda_max tracked on microbatches) from the single-process values (a sweep across processes: the sigma_sweep launcher test) on the whole data (computed in each process on one local device)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lsgeo import launch  # noqa: E402

launch.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from conftest import ce_objective, mlp_apply, mlp_init  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from lsgeo import curvature, losses, train  # noqa: E402


def value(a):
    return np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a, np.float64)


def relative(a, b):
    a, b = np.ravel(value(a)), np.ravel(value(b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def flat(tree):
    return np.concatenate([np.ravel(value(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def training_errors(f, params, batch, whole, one):
    """Data-parallel training on the sharded batch against one local device on the whole data."""
    errors = {}
    for name, batch_size in (("gd", None), ("sgd", 4)):
        run = dict(num_steps=20, eval_every=10, batch_size=batch_size, key=3)
        result = train.train(f, optax.sgd(0.3), params, batch, **run)
        reference = train.train(f, optax.sgd(0.3), params, whole, devices=one, **run)
        errors[f"train {name} losses"] = relative(result.history["train_loss"], reference.history["train_loss"])
        errors[f"train {name} params"] = relative(flat(result.params), flat(reference.params))
    run = dict(num_steps=10, eval_every=10, key=3)  # a tracker on microbatches of the sharded batch
    tracked = train.train(f, optax.sgd(0.3), params, batch, measure=train.top_eigenvalue_tracker(
        f, num_iters=12, tol=None, microbatch_size=3), **run)
    reference = train.train(f, optax.sgd(0.3), params, whole, devices=one, measure=train.top_eigenvalue_tracker(
        f, num_iters=12, tol=None), **run)
    errors["train tracked lambda_max"] = relative(tracked.history["lambda_max"], reference.history["lambda_max"])
    return errors


def kronecker_errors(params, batch, whole, one, u):
    """KFAC and EKFAC fitted on the process-sharded batch (microbatches of 3) against one local device on the
    whole data: their products and their damped inverses' products."""
    errors = {}
    for cls in (curvature.KFAC, curvature.EKFAC):
        op = cls(mlp_apply, losses.softmax_cross_entropy, params, batch, microbatch_size=3)
        reference = cls(mlp_apply, losses.softmax_cross_entropy, params, whole, devices=one)
        errors[f"{cls.__name__} product"] = relative(op @ u, reference @ u)
        errors[f"{cls.__name__} inverse product"] = relative(op.inverse(0.1) @ u, reference.inverse(0.1) @ u)
    return errors


def main():
    rank, count = jax.process_index(), jax.process_count()
    rng = np.random.default_rng(0)
    n = 44  # 11 examples per device: microbatches of 3, 3, 3 and a last one of 2
    x, y = rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), mlp_init(0, (5, 7, 3)))
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec("data"))
    mine = slice(rank * n // count, (rank + 1) * n // count)
    batch = tuple(jax.make_array_from_process_local_data(sharding, a[mine]) for a in (x, y))
    f, one = ce_objective(mlp_apply), [jax.local_devices()[0]]
    hessian = curvature.Hessian(f, params, batch, microbatch_size=3)
    reference = curvature.Hessian(f, params, (x, y), devices=one)
    gauss_newton = curvature.GaussNewton(mlp_apply, losses.softmax_cross_entropy, params, batch, microbatch_size=3)
    gn_reference = curvature.GaussNewton(mlp_apply, losses.softmax_cross_entropy, params, (x, y), devices=one)
    u = np.asarray(jax.random.normal(jax.random.key(1), (hessian.size,), jnp.float32))
    key = jax.random.key(2)
    errors = {
        "hessian product": relative(hessian @ u, reference @ u),
        "gauss-newton product": relative(gauss_newton @ u, gn_reference @ u),
        "top eigenvalues": relative(curvature.top_eigenvalues(hessian, key, k=2, num_iters=12),
                                    curvature.top_eigenvalues(reference, key, k=2, num_iters=12)),
        "hutchinson trace": relative(curvature.hessian_trace(hessian, key, num_probes=6),
                                     curvature.hessian_trace(reference, key, num_probes=6)),
        **training_errors(f, params, batch, (x, y), one),
        **kronecker_errors(params, batch, (x, y), one, u),
    }
    print(json.dumps({"process": rank, "processes": count, "devices": jax.device_count(),
                      "local_examples": hessian.plan.local_examples, "errors": errors}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
