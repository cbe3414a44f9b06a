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


def _trace_tracker(**kw):
    from lsgeo.curvature.track import trace_tracker

    return trace_tracker(loss, num_probes=2, **kw)


@pytest.mark.parametrize("name, owner", [("train_loss", "the loop"), ("step", "the loop"), ("batch_loss", "the loop")])
def test_a_measurement_metric_named_like_a_loop_column_is_refused(name, owner):
    """Issue 27: a measurement's metric name overwrote the history column silently."""
    with pytest.raises(ValueError, match=f"the measurement returns a metric named '{name}', and so does {owner}"):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, measure=_trace_tracker(name=name))


def test_a_measurement_metric_named_like_an_eval_fn_metric_is_refused_in_train_and_sweep():
    """The trace tracker's default name "trace" beside an eval_fn metric "trace": a ValueError naming both."""
    fn = lambda p, b: {"trace": jnp.sum(p["l2"]["w"] ** 2)}
    with pytest.raises(ValueError, match="metric named 'trace', and so does eval_fn"):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, eval_fn=fn, measure=_trace_tracker())
    with pytest.raises(ValueError, match="metric named 'trace', and so does eval_fn"):
        sweep(loss, lambda seed: optax.sgd(0.1), W0, DATA, {}, [0], num_steps=2, eval_fn=fn, measure=_trace_tracker())
    with pytest.raises(ValueError, match="metric named 'swa_train_loss', and so does the SWA evaluation"):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, swa_start=1, measure=_trace_tracker(name="swa_train_loss"))
    res = train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, eval_fn=fn, measure=_trace_tracker(name="tr"))
    assert {"trace", "tr", "tr_stderr"} <= set(res.history)


def test_resuming_with_another_measurement_is_a_clear_error():
    """Issue 27: resuming a run tracked by trace_tracker with top_eigenvalue_tracker failed deep in JAX
    ("unexpected PRNG key type")."""
    from lsgeo.curvature.track import top_eigenvalue_tracker

    first = train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, measure=_trace_tracker())
    with pytest.raises(ValueError, match="measure does not match the resumed state"):
        train(loss, optax.sgd(0.1), first.state, DATA, num_steps=2, measure=top_eigenvalue_tracker(loss, num_iters=4))
    eigen = train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, measure=top_eigenvalue_tracker(loss, num_iters=4))
    with pytest.raises(ValueError, match="measure does not match the resumed state: leaf .vectors"):
        train(loss, optax.sgd(0.1), eigen.state, DATA, num_steps=2,
              measure=top_eigenvalue_tracker(loss, k=2, num_iters=4))
    more = train(loss, optax.sgd(0.1), first.state, DATA, num_steps=2, measure=_trace_tracker())  # the same kind
    assert more.steps == 4 and np.isfinite(more.history["trace"][-1])


def test_measure_data_of_the_wrong_shape_names_measure_data():
    """Issue 27: 5 input features where the model takes 3 failed inside the objective without naming measure_data."""
    bad = (np.ones((4, 5), np.float32), np.ones((4, 1), np.float32))
    with pytest.raises(ValueError, match=r"the measurement cannot run on measure_data \(leaf shapes .*\(4, 5\)"):
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, measure=_trace_tracker(), measure_data=bad)
    with pytest.raises(ValueError, match="the measurement cannot run on measure_data"):
        sweep(loss, lambda seed: optax.sgd(0.1), W0, DATA, {}, [0], num_steps=2, measure=_trace_tracker(),
              measure_data=bad)
    with pytest.raises(ValueError, match="cannot run on measure_data .*not enough values to unpack"):  # no labels
        train(loss, optax.sgd(0.1), W0, DATA, num_steps=2, measure=_trace_tracker(), measure_data=(X,))


def test_sweep_of_a_train_state_says_it_takes_params():
    """Issue 27: sweep(state) said "params leaf .step has dtype int32"."""
    state = train(loss, optax.sgd(0.1), W0, DATA, num_steps=2).state
    with pytest.raises(ValueError, match="sweep takes params, .* not a TrainState"):
        sweep(loss, lambda seed: optax.sgd(0.1), state, DATA, {}, [0], num_steps=2)


def test_train_and_sweep_share_one_description_of_their_options():
    """train and sweep take the fields of one RunOptions (their signatures show them); an unknown or missing
    keyword is a TypeError naming the function."""
    import dataclasses
    import inspect

    from lsgeo.train import RunOptions

    fields = [f.name for f in dataclasses.fields(RunOptions)]
    for fn in (train, sweep):
        parameters = inspect.signature(fn).parameters
        assert set(fields) <= set(parameters) and parameters["num_steps"].default is inspect.Parameter.empty
        assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in fields)
    with pytest.raises(TypeError, match=r"train\(\) got unexpected keyword argument\(s\) \['num_step'\]"):
        train(loss, optax.sgd(0.1), W0, DATA, num_step=2)
    with pytest.raises(TypeError, match=r"sweep\(\) missing required keyword argument 'num_steps'"):
        sweep(loss, lambda seed: optax.sgd(0.1), W0, DATA, {}, [0])
