"""Run by tests/test_curvature_sharded.py in a subprocess with 8 forced host devices: a tanh MLP whose kernels
are sharded 8 ways over their output width (``NamedSharding(Mesh(devices, ("model",)), P(None, "model"))``,
tensor parallelism) against the same MLP on one device, in float64. Top-k eigenvalues (against the
unsharded operator and a dense ``eigh``), an SLQ density (same probes), the layout of the Lanczos basis
and of the Ritz vectors, and the host-memory basis (eigenvalues and Ritz vectors). Prints one JSON line.
Sized to compile few programs: most of its ~15 s is compilation for 8 devices."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import ce_objective, mlp_apply, mlp_init  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lsgeo import curvature  # noqa: E402


def _name(spec) -> str:
    """A PartitionSpec as "P(...)" (recent JAX's repr; the 0.8.1 floor writes "PartitionSpec(...)")."""
    return str(spec).replace("PartitionSpec(", "P(")


def _spec(array) -> str:
    return _name(array.sharding.spec)


def rel(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main():
    devices = jax.devices()
    mesh = Mesh(np.asarray(devices), ("model",))
    kernel, replicated = NamedSharding(mesh, P(None, "model")), NamedSharding(mesh, P())
    params = mlp_init(0, (4, 16, 2))  # kernels [4, 16] (split 8 ways: 2 columns a device) and [16, 2] (m = 114)
    rng = np.random.default_rng(1)
    batch = (rng.standard_normal((32, 4)), rng.integers(0, 2, size=32))
    f = ce_objective(mlp_apply)

    def layout(path, a):
        name = jax.tree_util.keystr(path)
        return jax.device_put(a, kernel if name.endswith("['w']") and a.shape[1] % len(devices) == 0 else replicated)

    sharded_params = jax.tree_util.tree_map_with_path(layout, params)
    single_params = jax.tree_util.tree_map(lambda a: jax.device_put(a, devices[0]), params)
    sharded = curvature.Hessian(f, sharded_params, batch)
    single = curvature.Hessian(f, single_params, batch)
    key = jax.random.key(0)
    out = {"devices": len(devices), "m": sharded.size}
    layout = jax.tree_util.tree_leaves(curvature.vector_shardings(sharded.params))
    out["vector_layout"] = [_name(s.spec) for s in layout]
    assert curvature.vector_shardings(single.params) is None

    hessian = np.asarray(single.to_dense())
    dense = np.linalg.eigvalsh(hessian)[::-1]
    k, num_iters = 3, 40
    top_sharded = curvature.top_eigenvalues(sharded, key, k=k, num_iters=num_iters)
    top_single = curvature.top_eigenvalues(single, key, k=k, num_iters=num_iters)
    top_host, host_vectors = curvature.eigenpairs(sharded, key, k=k, num_iters=num_iters, basis_memory="host")
    out["top"] = np.asarray(top_sharded).tolist()
    out["top_vs_single"] = rel(top_sharded, top_single)
    out["top_vs_dense"] = rel(top_sharded, dense[:k])
    out["host_vs_device"] = rel(top_host, top_sharded)
    out["host_vs_dense"] = rel(top_host, dense[:k])

    out["ritz_vector_specs"] = [_spec(a) for a in jax.tree_util.tree_leaves(host_vectors)]
    host_leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(host_vectors)]
    flat_vectors = np.concatenate([a.reshape(k, -1) for a in host_leaves], axis=1)  # ravel_pytree order
    out["eigvec_residual"] = float(np.max(np.abs(flat_vectors @ hessian - np.asarray(top_host)[:, None] * flat_vectors)))

    # the Lanczos basis itself: a pytree shaped like the parameters, every leaf sharded like its parameter
    shardings = curvature.vector_shardings(sharded.params)

    @jax.jit
    def basis_of(op, v0):
        return curvature.lanczos(op.tree_matvec, v0, 12, return_vectors=True, shardings=shardings)[2]

    start = jax.tree_util.tree_map(lambda a: jnp.ones_like(a), sharded.params)
    basis = basis_of(sharded, start)
    out["basis_specs"] = [_spec(b) for b in jax.tree_util.tree_leaves(basis)]
    out["basis_shapes"] = [list(b.shape) for b in jax.tree_util.tree_leaves(basis)]
    out["basis_shard_shapes"] = [list(b.addressable_shards[0].data.shape) for b in jax.tree_util.tree_leaves(basis)]
    flat = np.stack([np.concatenate([np.ravel(np.asarray(b)[i]) for b in jax.tree_util.tree_leaves(basis)])
                     for i in range(12)])
    out["basis_orthonormality"] = float(np.max(np.abs(flat @ flat.T - np.eye(12))))

    settings = {"num_iters": 16, "num_runs": 2, "vectors_per_pass": 1, "width": 0.05, "grid": jnp.linspace(-0.5, 1.0, 64)}
    _, rho_sharded = curvature.spectral_density(sharded, key, **settings)
    _, rho_single = curvature.spectral_density(single, key, **settings)
    out["density_vs_single"] = rel(rho_sharded, rho_single)
    print(json.dumps(out))


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)  # here, not at import: pytest --doctest-modules imports this file
    main()
