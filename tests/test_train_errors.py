"""lsgeo.train refuses, before it trains, what would otherwise fail deep inside optax/jax or silently
(issue 20): metrics that would replace the loop's columns, a resumed state with another optimizer, bad
keys and devices, vector objectives, non-finite initial parameters, sweep factories that are not
optimizers or branch on their traced hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_problem import W0, X, Y, loss

from lsgeo.optim import noise_injection
from lsgeo.train import sweep, train

DATA = (X, Y)


@pytest.mark.parametrize("name", ["step", "train_loss", "batch_loss"])
def test_eval_fn_metric_that_would_replace_a_loop_column_is_refused(name):
    with pytest.raises(ValueError, match=f"eval_fn returned a metric named '{name}'"):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, eval_fn=lambda p, b: {name: jnp.sum(p["l2"]["w"])})


def test_eval_fn_swa_named_metric_is_refused_under_swa_only():
    fn = lambda p, b: {"swa_norm": jnp.sum(p["l2"]["w"] ** 2), "norm": jnp.sum(p["l2"]["w"] ** 2)}
    with pytest.raises(ValueError, match="'swa_norm'"):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, eval_fn=fn, swa_start=1)
    res = train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, eval_fn=fn)  # no SWA columns: no clash
    assert {"step", "train_loss", "batch_loss", "swa_norm", "norm"} == set(res.history)
    np.testing.assert_array_equal(res.history["step"], [0, 2])


def test_eval_fn_clash_is_refused_in_a_sweep_too():
    with pytest.raises(ValueError, match="'train_loss'"):
        sweep(loss, lambda seed: optax.sgd(0.1), W0, DATA, {}, [0], num_steps=2,
              eval_fn=lambda p, b: {"train_loss": jnp.sum(p["l2"]["w"])})


def test_resume_with_another_optimizer_names_the_mismatch():
    first = train(loss, optax.sgd(0.1), W0, DATA, num_steps=2)
    with pytest.raises(ValueError, match="optimizer does not match the resumed state"):
        train(loss, optax.adam(0.1), first.state, DATA, num_steps=2)
    noisy = train(loss, noise_injection(optax.sgd(0.1), 0.1), W0, DATA, num_steps=2)
    with pytest.raises(ValueError, match="optimizer does not match the resumed state"):
        train(loss, optax.sgd(0.1), noisy.state, DATA, num_steps=2)
    # the same optimizer (a new but equal object) resumes
    more = train(loss, optax.sgd(0.1), first.state, DATA, num_steps=2)
    assert more.steps == 4


@pytest.mark.parametrize("key", ["a", 2**40, 1.5, -(2**31) - 1, jnp.zeros(3)])
def test_bad_key_is_refused_naming_it(key):
    with pytest.raises(ValueError, match="key must be"):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=1, key=key)


@pytest.mark.parametrize(
    "devices, match",
    [([], "devices must hold at least one device"), (lambda d: [d, d], "devices must not repeat"),
     (["cpu"], "devices must hold jax devices"), (lambda d: d, "devices must be a sequence")],
)
def test_bad_devices_are_refused_naming_them(devices, match):
    devices = devices(jax.devices()[0]) if callable(devices) else devices
    with pytest.raises(ValueError, match=match):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=1, devices=devices)
    with pytest.raises(ValueError, match=match):
        sweep(loss, lambda seed: optax.sgd(0.1), W0, DATA, {}, [0], num_steps=1, devices=devices)


def test_vector_valued_objective_is_refused():
    per_example = lambda p, b: (jnp.tanh(b[0] @ p["l1"]["w"]) @ p["l2"]["w"] - b[1])[:, 0] ** 2
    with pytest.raises(ValueError, match=r"objective must return a scalar .* shape \(16,\)"):
        train(per_example, optax.sgd(0.1), W0, DATA, num_steps=1)


def test_non_finite_initial_params_are_a_value_error_naming_the_leaf():
    bad = jax.tree.map(np.copy, W0)
    bad["l2"]["w"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"params leaf \['l2'\]\['w'\] holds non-finite"):
        train(loss, optax.sgd(0.1), bad, DATA, num_steps=1)
    with pytest.raises(ValueError, match=r"params\(init_key\) leaf .* holds non-finite"):
        train(loss, optax.sgd(0.1), lambda k: bad, DATA, num_steps=1)
    with pytest.raises(ValueError, match="params leaf .* holds non-finite"):
        sweep(loss, lambda seed: optax.sgd(0.1), bad, DATA, {}, [0], num_steps=1)


def test_sweep_factory_returning_a_non_optimizer_is_a_type_error():
    with pytest.raises(TypeError, match="optimizer_fn must return an optax.GradientTransformation, got function"):
        sweep(loss, lambda learning_rate, seed: optax.sgd, W0, DATA, {"learning_rate": [0.1]}, [0], num_steps=1)


def test_sweep_factory_branching_on_a_traced_hyperparameter_is_a_type_error():
    def branching(sigma, seed):
        return noise_injection(optax.sgd(0.1), sigma, seed=seed) if sigma > 0 else optax.sgd(0.1)

    with pytest.raises(TypeError, match=r"and seed \(sigma, seed\) as traced jax scalars"):
        sweep(loss, branching, W0, DATA, {"sigma": [0.0, 0.1]}, [0], num_steps=1)


@pytest.mark.parametrize("seeds", [[2**31], [-1]])
def test_sweep_seeds_outside_int32_are_refused(seeds):
    with pytest.raises(ValueError, match="seeds must be integers in"):
        sweep(loss, lambda seed: optax.sgd(0.1), W0, DATA, {}, seeds, num_steps=1)
