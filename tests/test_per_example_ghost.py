"""The ghost-norm tracer: it is taken on dense MLPs with the installed JAX, and everything it cannot
handle (unknown primitives, a failure of the interpretation machinery) gives the generic path's numbers."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from lsgeo import jaxpr_interpreter as interp
from lsgeo import per_example as pe
from lsgeo.per_example import ghost

N, D_IN, D_HID, D_OUT = 5, 7, 11, 3


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def dense_grams(predict, params, x):
    """[n, k, k] J_i J_i^T from jax.jacobian of the full-batch predictor (the independent reference)."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda f: predict(unravel(f), x))(flat).reshape(x.shape[0], -1, flat.shape[0])
    return jnp.einsum("ikm,ilm->ikl", jac, jac)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT)(jnp.tanh(nn.Dense(D_HID)(x)))


def jnp_mlp(p, x):
    return jnp.dot(jnp.tanh(jnp.dot(x, p["w1"]) + p["b1"]), p["w2"]) + p["b2"]


def _mlps():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (N, D_IN))
    linen = LinenMLP()
    jnp_params = {"w1": jax.random.normal(k[1], (D_IN, D_HID)) / 3, "b1": jnp.full(D_HID, 0.1),
                  "w2": jax.random.normal(k[2], (D_HID, D_OUT)) / 3, "b2": jnp.zeros(D_OUT)}
    return {"linen": (lambda p, x: linen.apply({"params": p}, x), linen.init(k[3], x)["params"], x),
            "jnp": (jnp_mlp, jnp_params, x)}


MLPS = _mlps()

# per-example kernel gradients: arrays [..., r, *kernel shape] with r = D_OUT cotangents (gram_blocks)
_PER_EXAMPLE_KERNEL = re.compile(rf"\[(\d+,)*{D_OUT},({D_IN},{D_HID}|{D_HID},{D_OUT})\]")


@pytest.mark.parametrize("name", sorted(MLPS))
def test_fast_path_is_taken_on_dense_mlps(name):
    """Fails loudly when the installed JAX silently stops using the ghost norms."""
    predict, params, x = MLPS[name]
    plan = pe.fast_path_plan(predict, params, x)
    assert {p: s for p, s in plan.items() if p.endswith(("kernel", "w1", "w2"))} == {
        p: "dense" for p in plan if p.endswith(("kernel", "w1", "w2"))}
    assert {p: s for p, s in plan.items() if p.endswith(("bias", "b1", "b2"))} == {
        p: "elementwise" for p in plan if p.endswith(("bias", "b1", "b2"))}
    assert len(plan) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", pe.FastPathFallbackWarning)
        fast_jaxpr = str(jax.make_jaxpr(lambda p, x: pe.gram_blocks(predict, p, x))(params, x))
        fast = pe.gram_blocks(predict, params, x)
    generic_jaxpr = str(jax.make_jaxpr(lambda p, x: pe.gram_blocks(predict, p, x, method="generic"))(params, x))
    assert _PER_EXAMPLE_KERNEL.search(generic_jaxpr)  # the pattern does see per-example kernel gradients
    assert not _PER_EXAMPLE_KERNEL.search(fast_jaxpr), "method='fast' formed per-example kernel gradients"
    np.testing.assert_allclose(fast, pe.gram_blocks(predict, params, x, method="generic"), rtol=1e-5, atol=1e-6)


@jax.custom_jvp
def _doubled(w):
    return 2.0 * w


@_doubled.defjvp
def _doubled_jvp(primals, tangents):
    return _doubled(primals[0]), 2.0 * tangents[0]


@pytest.mark.parametrize("through", ["cumsum", "custom_jvp"])
def test_unknown_primitive_falls_back_per_leaf(through, x64):
    """A kernel used through a primitive the tracer does not know takes the generic path; the rest stay fast."""
    view = (lambda w: jnp.cumsum(w, axis=0)) if through == "cumsum" else _doubled

    def predict(p, x):
        return jnp.tanh(x @ view(p["w1"]) + p["b1"]) @ p["w2"]

    k = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {"w1": jax.random.normal(k[0], (4, 5)) / 2, "b1": jnp.ones(5) / 10, "w2": jax.random.normal(k[1], (5, 2))}
    x = jax.random.normal(k[2], (N, 4))
    assert pe.fast_path_plan(predict, params, x) == {"b1": "elementwise", "w1": "generic", "w2": "dense"}
    fast = pe.gram_blocks(predict, params, x)
    np.testing.assert_allclose(fast, pe.gram_blocks(predict, params, x, method="generic"), rtol=1e-10)
    np.testing.assert_allclose(fast, dense_grams(predict, params, x), rtol=1e-10)


def _broken(*args, **kwargs):
    raise AttributeError("simulated change of the jaxpr constructor")


def test_machinery_failure_falls_back_whole(monkeypatch, x64):
    """A failure inside the interpretation (here: building a sub-jaxpr) makes every leaf generic, with a warning."""
    monkeypatch.setattr(interp, "_JAXPR", _broken)

    def predict(p, x):
        return jnp_mlp(p, x)

    params, x = _f64(MLPS["jnp"][1:])
    with pytest.warns(pe.FastPathFallbackWarning, match="simulated"):
        assert set(pe.fast_path_plan(predict, params, x).values()) == {"generic"}
    with pytest.warns(pe.FastPathFallbackWarning, match="simulated"):
        got = pe.gram_blocks(predict, params, x)
    np.testing.assert_allclose(got, dense_grams(predict, params, x), rtol=1e-10)


def test_trace_time_failure_falls_back(monkeypatch, x64):
    """A failure that only shows when the plan is traced for real (no dry run) still gives the generic numbers."""
    monkeypatch.setattr(ghost, "_dry_run", lambda *args: None)
    monkeypatch.setattr(interp, "_JAXPR", _broken)

    def predict(p, x):
        return jnp_mlp(p, x)

    params, x = _f64(MLPS["jnp"][1:])
    with pytest.warns(pe.FastPathFallbackWarning, match="simulated"):
        got = pe.sq_grad_norms(predict, params, x, jnp.ones((N, D_OUT)))
    np.testing.assert_allclose(got, jnp.einsum("ikl->i", dense_grams(predict, params, x)), rtol=1e-10)


def test_missing_primitive_export(monkeypatch):
    """A JAX that no longer exports dot_general_p: kernels become generic, never wrongly dense."""
    monkeypatch.setattr(ghost, "_DOT", ())
    with pytest.warns(pe.FastPathFallbackWarning, match="dot_general_p"):
        plan = pe.fast_path_plan(*MLPS["jnp"])
    assert set(plan.values()) == {"generic"}


def test_user_error_is_the_generic_paths():
    """An error of the caller's own code is raised as on the generic path, not reported as a fallback."""
    predict, params, x = MLPS["jnp"]

    def bad_cotangents(phi, aux):
        raise ValueError("bad cotangent_fn")

    with warnings.catch_warnings():
        warnings.simplefilter("error", pe.FastPathFallbackWarning)
        with pytest.raises(ValueError, match="bad cotangent_fn"):
            pe.per_example_grams(predict, params, x, cotangent_fn=bad_cotangents, num_cotangents=1)


def test_interpreter_segments_carry_a_debug_info():
    """The sub-jaxprs the interpreter evaluates are built with a DebugInfo: JAX's deprecation warning for a jaxpr
    without one is not raised (tests/conftest.py also turns it into an error suite-wide). Where JAX has no public
    ``jax.extend.core.DebugInfo`` (jax 0.8.1) there is nothing to build one with, and JAX warns."""
    import jax.extend.core  # noqa: PLC0415

    if getattr(jax.extend.core, "DebugInfo", None) is None:
        pytest.skip("this JAX has no public jax.extend.core.DebugInfo")
    closed = jax.make_jaxpr(lambda x: jnp.sin(x) * 2.0 + 1.0)(1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing a DebugInfo.*")
        (out,) = interp.evaluate(closed.jaxpr, closed.consts, [0.5], select=lambda i, e: e.primitive.name == "mul",
                                 handle=lambda i, e, ins: [ins[0] * 3.0])
    assert float(out) == pytest.approx(float(jnp.sin(0.5) * 3.0 + 1.0))
