"""lsgeo.cpu_convolutions: the rewrite to XLA:CPU's canonical convolution layout keeps every value and
leaves only canonical convolutions, including those that reverse-mode autodiff produces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo.cpu_convolutions import canonicalize_convolutions


def net(params, x):  # NCHW input, strided, dilated and grouped convolutions inside a jit
    h = jax.lax.conv_general_dilated(x, params["a"], (2, 2), "SAME", rhs_dilation=(2, 1),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    h = jnp.tanh(h)
    h = jax.jit(lambda h, w: jax.lax.conv_general_dilated(h, w, (1, 1), "VALID", feature_group_count=2,
                                                          dimension_numbers=("NCHW", "HWIO", "NHWC")))(h, params["b"])
    return jnp.mean(jnp.sin(h))


def _canonical(eqn):
    lhs, rhs, out = eqn.params["dimension_numbers"]
    return tuple(lhs) == (0, 3, 1, 2) and tuple(rhs) == (3, 2, 0, 1) and tuple(out) == (0, 3, 1, 2)


def _convs(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield from _convs(inner)


def test_gradients_and_hvps_are_unchanged_and_canonical(x64):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((4, 3, 3, 3)), "b": rng.standard_normal((2, 2, 2, 6))}
    x = rng.standard_normal((5, 3, 9, 8))

    def hvp(p, x):
        return jax.jvp(lambda q: jax.grad(net)(q, x), (p,), (p,))[1]

    canonical = canonicalize_convolutions(hvp, "cpu")
    assert any(not _canonical(e) for e in _convs(jax.make_jaxpr(hvp)(params, x).jaxpr))
    assert all(_canonical(e) for e in _convs(jax.make_jaxpr(canonical)(params, x).jaxpr))

    def looped(fn):  # inside a scan body, where XLA:CPU's own canonicalisation does not reach
        return jax.jit(lambda p, x: jax.lax.scan(lambda c, _: (c, fn(p, x)), 0.0, None, length=2)[1])

    expected, got = looped(hvp)(params, x), looped(canonical)(params, x)
    for name in params:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(canonicalize_convolutions(net, "cpu")(params, x), net(params, x), rtol=1e-12)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_other_platforms_are_left_alone(platform):
    assert canonicalize_convolutions(net, platform) is net
