"""Run by tests/test_kfac.py in a subprocess with 4 forced host devices: KFAC and EKFAC fitted over microbatches
sharded over the 4 devices equal the one-device fit (float32). Prints one JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import kronecker_reference as ref  # noqa: E402

from lsgeo import curvature, losses  # noqa: E402


def main():
    p, x, y = ref.params_and_data(jax.random.PRNGKey(0), seq=True, n=30, dtype=jnp.float32)
    one = [jax.devices()[0]]
    errors = {}
    for name, cls in (("kfac", curvature.KFAC), ("ekfac", curvature.EKFAC)):
        for approx in ("expand", "reduce"):
            def build(d, cls=cls, approx=approx):
                return cls(ref.seq_predict, losses.softmax_cross_entropy, p, (x, y), kfac_approx=approx,
                           separate_weight_and_bias=False, microbatch_size=4, devices=d)
            sharded, single = build(None).to_dense(), build(one).to_dense()
            errors[f"{name} {approx}"] = float(np.linalg.norm(sharded - single) / np.linalg.norm(single))
    print(json.dumps({"devices": len(jax.devices()), "errors": errors}))


if __name__ == "__main__":
    main()
