"""lsgeo.validation: each check raises an error that names the argument, and lets good values pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo import validation as v


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: v.check_sigma("0.1"), ValueError, "sigma must be a finite number"),
        (lambda: v.check_sigma(True), ValueError, "sigma must be a finite number"),
        (lambda: v.check_sigma(-1.0), ValueError, "sigma must be a finite number"),
        (lambda: v.check_sigma(float("nan"), "rho"), ValueError, "rho must be a finite number"),
        (lambda: v.check_sigma(np.ones(2)), ValueError, "sigma must be a scalar"),
        (lambda: v.check_positive_int(0, "num_probes"), ValueError, "num_probes must be a positive integer"),
        (lambda: v.check_positive_int(2.0, "k"), ValueError, "k must be a positive integer"),
        (lambda: v.check_nonnegative_int(-1, "steps"), ValueError, "steps must be a non-negative integer"),
        (lambda: v.check_choice("sgd", "mode", ("full", "layerwise")), ValueError, "mode must be one of"),
        (lambda: v.check_callable(3, "predict"), TypeError, "predict must be a callable"),
        (lambda: v.check_same_structure({"a": 1.0}, {"b": 1.0}, "v"), ValueError, "v must have the same pytree"),
        (lambda: v.check_same_structure({"a": jnp.ones(2)}, {"a": jnp.ones(3)}, "v"), ValueError, r"v leaf \['a'\]"),
        (lambda: v.check_float_params({"w": jnp.ones(2, jnp.int32)}), ValueError, r"params leaf \['w'\] has dtype int32"),
        (lambda: v.check_batch((jnp.ones((0, 3)), jnp.ones(0))), ValueError, "batch is empty"),
        (lambda: v.check_batch((jnp.ones((4, 3)), jnp.ones(5)), common_axis=True), ValueError, "share a leading"),
        (lambda: v.check_batch((jnp.ones((4, 3)), jnp.ones(())), "data", common_axis=True), ValueError, "data leaves"),
        (lambda: v.check_class_labels(jnp.asarray([0, 10]), 10), ValueError, r"labels must be in \[0, 10\)"),
        (lambda: v.check_sign_labels(jnp.asarray([0, 1])), ValueError, "labels must be -1 or"),
    ],
)
def test_bad_values_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_good_values_pass_and_tracers_are_not_inspected():
    v.check_sigma(0.0)
    v.check_sigma(jnp.asarray(0.3))
    v.check_sigma(lambda count: 0.1)  # an optax schedule
    assert v.check_batch((jnp.ones((4, 3)), jnp.ones(4)), common_axis=True) == 4
    assert v.check_batch({"x": jnp.ones((2, 3)), "scale": 1.0}) == 2
    v.check_float_params({"w": jnp.ones(2, jnp.bfloat16)})
    # under jit every value check is skipped (a traced sigma of -1 cannot be inspected)
    jax.jit(lambda s, y: (v.check_sigma(s), v.check_class_labels(y, 2), s)[-1])(-1.0, jnp.asarray([5]))
