"""Run by tests/test_curvature_operators.py in a subprocess with 4 forced host devices: operators built with
microbatches sharded over the 4 devices hold about a quarter of the data on each device, and their
products and estimates equal the one-device values (float32). Prints one JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import ce_objective, mlp_apply, mlp_init  # noqa: E402

from lsgeo import curvature, losses  # noqa: E402


def main():
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), mlp_init(0, (5, 8, 3)))
    rng = np.random.default_rng(1)
    n = 400  # 40 microbatches of 10: 10 on each device
    x, y = rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, size=n)
    batch = (jnp.asarray(x), jnp.asarray(y))
    one = [jax.devices()[0]]
    key = jax.random.key(0)
    builders = {
        "hessian": lambda d: curvature.Hessian(ce_objective(mlp_apply), params, batch, microbatch_size=10, devices=d),
        "gauss_newton": lambda d: curvature.GaussNewton(mlp_apply, losses.softmax_cross_entropy, params, batch,
                                                        microbatch_size=10, devices=d),
    }
    errors, per_device = {}, None
    for name, build in builders.items():
        sharded, single = build(None), build(one)
        if per_device is None:  # 40 microbatches of 10 over 4 devices: 10 microbatches (100 examples) each
            per_device = {}
            for leaf in jax.tree_util.tree_leaves(sharded.data):
                for shard in leaf.addressable_shards:
                    per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
        u = jnp.asarray(rng.standard_normal((3, sharded.size)), jnp.float32)
        pairs = {
            "products": (sharded @ u, single @ u),
            "top_eigenvalues": (curvature.top_eigenvalues(sharded, key, k=2, num_iters=10),
                                curvature.top_eigenvalues(single, key, k=2, num_iters=10)),
            "hessian_trace": (curvature.hessian_trace(sharded, key, num_probes=4),
                              curvature.hessian_trace(single, key, num_probes=4)),
        }
        for what, (a, b) in pairs.items():
            a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
            errors[f"{name} {what}"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(json.dumps({"devices": len(jax.devices()), "data_bytes": int(batch[0].nbytes + batch[1].nbytes),
                      "bytes_per_device": list(per_device.values()), "errors": errors}))


if __name__ == "__main__":
    main()
