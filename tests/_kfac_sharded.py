"""Run by tests/test_kfac.py in a subprocess with 8 forced host devices: KFAC and EKFAC of a tanh MLP 4-16-2 whose
first kernel ``[4, 16]`` is sharded 8 ways over its output width (``P(None, "model")``) and second ``[16, 2]``
over its input width (``P("model", None)``: tensor parallelism), against the same operators on one device, in
float64 (also fitted over microbatches sharded over the same 8 devices): the factors, eigenvalues, products
and inverse products equal, and their layouts (``.sharding.spec``, the shard each device holds). Prints one
JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import mlp_apply, mlp_init  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lsgeo import curvature, losses  # noqa: E402


def rel(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def specs(tree):
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda a: a is None)
    # repr of a PartitionSpec: "P(...)" on recent JAX, "PartitionSpec(...)" on the floor (0.8.1)
    return [None if a is None else str(a.sharding.spec).replace("PartitionSpec(", "P(") for a in leaves]


def shard_shapes(tree):
    return [list(a.addressable_shards[0].data.shape) for a in jax.tree_util.tree_leaves(tree)]


def main():
    devices = jax.devices()
    mesh = Mesh(np.asarray(devices), ("model",))
    params = mlp_init(0, (4, 16, 2))  # b [16], w [4, 16] (2 columns a device), b [2], w [16, 2] (2 rows a device)
    spec = {"[0]['w']": P(None, "model"), "[1]['w']": P("model", None)}

    def layout(path, a):
        return jax.device_put(a, NamedSharding(mesh, spec.get(jax.tree_util.keystr(path), P())))

    sharded_params = jax.tree_util.tree_map_with_path(layout, params)
    single_params = jax.tree_util.tree_map(lambda a: jax.device_put(a, devices[0]), params)
    rng = np.random.default_rng(1)
    batch = (rng.standard_normal((34, 4)), rng.integers(0, 2, size=34))
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    out = {"devices": len(devices), "param_specs": specs(sharded_params), "errors": {}, "layouts": {}}
    for name, cls, mb in (("kfac", curvature.KFAC, None), ("ekfac", curvature.EKFAC, None),
                          ("kfac microbatches", curvature.KFAC, 4)):  # 34 = 8 x 4 + 2: one microbatch a device
        sharded = cls(mlp_apply, losses.softmax_cross_entropy, sharded_params, batch, microbatch_size=mb)
        single = cls(mlp_apply, losses.softmax_cross_entropy, single_params, batch, microbatch_size=mb,
                     devices=devices[:1])
        fitted = [k for k in sharded.factors if k not in ("qa", "qg")]  # eigenvectors: signs are arbitrary
        pairs = [(a, b) for k in fitted for a, b in zip(jax.tree_util.tree_leaves(sharded.factors[k]),
                                                        jax.tree_util.tree_leaves(single.factors[k]))]
        errors = {"factors": max(rel(a, b) for a, b in pairs),
                  "dense": rel(sharded.to_dense(), single.to_dense())}
        layouts = {"factors": {k: specs(x) for k, x in sharded.factors.items()},
                   "factor_shards": {k: shard_shapes(x) for k, x in sharded.factors.items()}}
        products = {"op @ v": lambda op: op @ v, "inverse(0.1) @ v": lambda op: op.inverse(0.1) @ v,
                    "diagonal": lambda op: op.diagonal()}
        if cls is curvature.KFAC:
            products["heuristic inverse @ v"] = lambda op: op.inverse(0.1, heuristic_damping=True) @ v
            layouts["decomposition"] = specs(sharded.decomposition())
            errors["decomposition eigenvalues"] = max(rel(a[0], b[0]) for pair_a, pair_b in
                                                      zip(sharded.decomposition(), single.decomposition())
                                                      for a, b in zip(pair_a, pair_b))
            inverse_units = sharded.inverse(0.1, heuristic_damping=True).units
            layouts["heuristic inverse units"] = {k: specs(x) for k, x in inverse_units.items()}
        layouts["inverse units"] = {k: specs(x) for k, x in sharded.inverse(0.1).units.items()}
        for what, product in products.items():
            result = product(sharded)
            errors[what] = rel(jax.flatten_util.ravel_pytree(result)[0],
                               jax.flatten_util.ravel_pytree(product(single))[0])
            layouts[what] = specs(result)
        out["errors"][name], out["layouts"][name] = errors, layouts
    print(json.dumps(out))


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)  # here, not at import: pytest --doctest-modules imports this file
    main()
