"""Run by tests/test_dataplan.py in a subprocess with 4 forced host devices: every microbatched function
on the 4-device mesh against the same function on one device (float32). Prints one JSON line
{"devices": 4, "errors": {name: relative error ||a - b|| / ||b||}, "all_reduce": bool}."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import ce_objective, mlp_apply, mlp_init  # noqa: E402

from lsgeo import curvature, losses, ntk, risk  # noqa: E402


def f32(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32) if np.issubdtype(np.asarray(a).dtype,
                                                                                     np.floating) else a, tree)


def main():
    params = f32(mlp_init(0, (5, 8, 3)))
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.standard_normal((50, 5)), jnp.float32), jnp.asarray(rng.integers(0, 3, size=50)))
    f = ce_objective(mlp_apply)
    ce = losses.softmax_cross_entropy
    key = jax.random.key(0)
    v = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.1), params)
    one = [jax.devices()[0]]
    calls = {
        "hvp": lambda d, s: curvature.hvp(f, params, batch, v, microbatch_size=s, devices=d),
        "hessian_trace": lambda d, s: curvature.hessian_trace(f, params, batch, key, num_probes=4,
                                                              microbatch_size=s, devices=d),
        "top_eigenvalues": lambda d, s: curvature.top_eigenvalues(f, params, batch, key, k=2, num_iters=8,
                                                                  microbatch_size=s, devices=d),
        "risk": lambda d, s: risk.risk(mlp_apply, ce, params, batch, microbatch_size=s, devices=d),
        "gauss_newton_trace": lambda d, s: risk.gauss_newton_trace(mlp_apply, ce, params, batch, microbatch_size=s,
                                                                   devices=d),
        "ntk_trace": lambda d, s: ntk.ntk_trace(mlp_apply, params, batch[0], microbatch_size=s, devices=d),
    }
    errors = {}
    for name, call in calls.items():
        # 50 = 7 x 7 + 1: seven full microbatches padded to 8 (a weight-0 copy), 2 per device, and a remainder
        a = np.concatenate([np.ravel(t) for t in jax.tree_util.tree_leaves(call(None, 7))])
        b = np.concatenate([np.ravel(t) for t in jax.tree_util.tree_leaves(call(one, 7))])
        errors[name] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    # arguments committed to one device are replicated over the mesh first (dataplan.place)
    committed = jax.device_put((params, batch, v), jax.devices()[2])
    a = np.concatenate([np.ravel(t) for t in jax.tree_util.tree_leaves(curvature.hvp(f, *committed, microbatch_size=7))])
    b = np.concatenate([np.ravel(t) for t in jax.tree_util.tree_leaves(calls["hvp"](one, 7))])
    errors["hvp, committed arguments"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    hlo = jax.jit(lambda p, b, v: curvature.hvp(f, p, b, v, microbatch_size=7)).lower(params, batch, v).as_text()
    # a batch-coupled objective on a batch sharded along its examples (each device's share used whole) is refused
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    sharded = jax.device_put(batch[0][:48], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    coupled = lambda p, x: jnp.mean(((x - jnp.mean(x, axis=0)) @ p[0]["w"]) ** 2)  # noqa: E731
    try:
        curvature.Hessian(coupled, params, sharded)
        refused = False
    except ValueError as error:
        refused = "not a mean over independent examples" in str(error)
    print(json.dumps({"devices": len(jax.devices()), "errors": errors, "all_reduce": "all_reduce" in hlo
                      or "all-reduce" in hlo or "psum" in hlo, "sharded_coupled_refused": refused}))


if __name__ == "__main__":
    main()
