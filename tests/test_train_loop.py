"""lsgeo.train.train against the ordinary optax loop written by hand: histories at the clean iterate, SWA,
SAM, minibatch order, bit-for-bit resume, divergence, bad arguments, several devices."""

import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_problem import W0, X, Y, _at, _manual, _minibatches, eval_fn, loss
from conftest import DEVICE_TRAIN_PROBLEM, run_python

from lsgeo.optim import noise_injection
from lsgeo.train import TrainingDiverged, init_state, sweep, train


def test_full_batch_noise_injection_history_and_swa():
    opt = noise_injection(optax.sgd(0.1), 0.05, mode="layerwise", seed=3)
    res = train(loss, opt, W0, (X, Y), num_steps=12, eval_every=4, eval_fn=eval_fn, eval_data=(X, Y), swa_start=6, swa_every=2)
    traj = _manual(opt, W0, lambda t: (X, Y), 12)
    chex.assert_trees_all_close(res.params, _at(traj, -1), atol=1e-6)
    assert res.steps == 12
    np.testing.assert_array_equal(res.history["step"], [0, 4, 8, 12])
    # evaluation at the clean parameters w_t, not the perturbed point
    clean_losses = jax.jit(jax.vmap(loss, in_axes=(0, None)))(traj, (X, Y))
    np.testing.assert_allclose(res.history["train_loss"][1:], np.asarray(clean_losses)[[3, 7, 11]], rtol=1e-5)
    np.testing.assert_allclose(res.history["test_loss"], res.history["train_loss"], rtol=1e-6)
    # SWA: mean of w_6, w_8, w_10, w_12; no SWA value before the first iterate is averaged in
    swa = jax.tree_util.tree_map(lambda a: np.mean(np.asarray(a)[[5, 7, 9, 11]], axis=0), traj)
    chex.assert_trees_all_close(res.swa_params, swa, atol=1e-6)
    assert np.all(np.isnan(res.history["swa_train_loss"][:2])) and np.all(np.isfinite(res.history["swa_test_loss"][2:]))


def test_minibatch_sgd_per_epoch_shuffling():
    opt = optax.sgd(0.05, momentum=0.5)
    res = train(loss, opt, W0, (X, Y), num_steps=12, eval_every=6, batch_size=4, key=5)
    traj = _manual(opt, W0, _minibatches(5, 4, 3), 12)
    chex.assert_trees_all_close(res.params, _at(traj, -1), atol=1e-6)


def test_model_state_updated_at_the_point_the_loop_holds():
    def objective(params, state, batch):
        x, y = batch
        h = jnp.tanh(x @ params["l1"]["w"])
        new_state = {"mean": 0.5 * state["mean"] + 0.5 * jnp.mean(h, axis=0)}
        return 0.5 * jnp.mean((h @ params["l2"]["w"] - y) ** 2), new_state

    opt = noise_injection(optax.sgd(0.1), 0.3, mode="full", seed=1)
    ms0 = {"mean": np.zeros(4, np.float32)}
    res = train(objective, opt, W0, (X, Y), num_steps=2, model_state=ms0,
                eval_fn=lambda p, s, b: {"state_norm": jnp.sum(s["mean"] ** 2)}, eval_data=None)
    # by hand: the statistics follow the loop's points z_0 = w_0 and z_1 = w_1 + xi_1; params never carry them
    z, state, ms = jnp.asarray(0), opt.init(W0), ms0
    z = W0
    for _ in range(2):
        (_, ms), g = jax.value_and_grad(lambda p: objective(p, ms, (X, Y)), has_aux=True)(z)
        updates, state = opt.update(g, state, z)
        z = optax.apply_updates(z, updates)
    np.testing.assert_allclose(res.model_state["mean"], ms["mean"], rtol=1e-5)
    assert "state_norm" in res.history
    assert jax.tree_util.tree_structure(res.opt_state.xi) == jax.tree_util.tree_structure(W0)


def _manual_sam(w, lr, rho, num_steps):
    g = jax.grad(loss)
    for _ in range(num_steps):
        d = g(w, (X, Y))
        nrm = jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(d)))
        adv = jax.tree_util.tree_map(lambda p, a: p + rho * a / nrm, w, d)
        w = jax.tree_util.tree_map(lambda p, a: p - lr * a, w, g(adv, (X, Y)))
    return w


def _sam(opaque):
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
    return optax.contrib.sam(optax.sgd(0.1), adv, opaque_mode=opaque)


def test_sam_opaque_and_transparent():
    ref = jax.jit(lambda w: _manual_sam(w, 0.1, 0.05, 3))(W0)
    opaque = train(loss, _sam(True), W0, (X, Y), num_steps=3)
    chex.assert_trees_all_close(opaque.params, ref, atol=1e-6)
    transparent = train(loss, _sam(False), W0, (X, Y), num_steps=6, eval_every=1)
    chex.assert_trees_all_close(transparent.params, ref, atol=1e-6)
    # between syncs the loop holds the adversarial point; evaluation uses the outer iterate
    tl = transparent.history["train_loss"]
    np.testing.assert_allclose(tl[1], tl[0], rtol=1e-6)


RESUME_CASES = {
    "minibatch SGD mid-epoch": (lambda: optax.sgd(0.05, momentum=0.9), dict(batch_size=3), 7),
    "noise injection": (lambda: noise_injection(optax.adam(0.01), 0.1, seed=2), dict(batch_size=4), 5),
    "transparent SAM mid-cycle": (lambda: _sam(False), {}, 3),
    "SWA": (lambda: noise_injection(optax.sgd(0.1), 0.05), dict(swa_start=2, swa_every=2), 5),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_equals_the_uninterrupted_run_bit_for_bit(case):
    make, kw, split = RESUME_CASES[case]
    opt = make()
    whole = train(loss, opt, W0, (X, Y), num_steps=12, eval_every=1, key=3, **kw)
    first = train(loss, opt, W0, (X, Y), num_steps=split, eval_every=1, key=3, **kw)
    rest = train(loss, opt, first.state, (X, Y), num_steps=12 - split, eval_every=1, **kw)
    chex.assert_trees_all_equal(rest.state, whole.state)
    for k, v in whole.history.items():  # the resumed run's first row is its start (batch_loss = train_loss there)
        start = {"batch_loss": rest.history["train_loss"][0]}.get(k, v[split])
        np.testing.assert_array_equal(rest.history[k], np.concatenate([[start], v[split + 1:]]), err_msg=k)


def test_divergence_names_step_and_quantity_and_keeps_the_last_finite_state():
    with pytest.raises(TrainingDiverged) as info:
        train(loss, optax.sgd(300.0), W0, (X, Y), num_steps=200, eval_every=2)
    err = info.value
    assert err.quantity in ("loss", "gradient", "params", "train_loss") and err.step > 0
    assert f"step {err.step}" in str(err) and err.quantity in str(err)
    h = err.history
    assert len(h["step"]) >= 1 and h["step"][-1] < err.step and np.all(np.isfinite(h["train_loss"]))
    # the state is frozen at the last finite step, which the hand-written loop reaches too
    assert int(err.state.step) == err.step and all(np.all(np.isfinite(a)) for a in jax.tree.leaves(err.params))
    reference = _at(_manual(optax.sgd(300.0), W0, lambda t: (X, Y), err.step), -1)
    chex.assert_trees_all_close(err.params, reference, rtol=1e-5)


def test_non_finite_start_names_the_real_quantity():
    bad = jax.tree.map(lambda a: np.full_like(a, np.nan), W0)
    with pytest.raises(ValueError, match="params leaf .* holds non-finite"):  # an argument error, not a divergence
        train(loss, optax.sgd(0.1), bad, (X, Y), num_steps=2)
    with pytest.raises(TrainingDiverged, match="step 0: train_loss") as info:  # finite w_0, non-finite loss
        train(lambda p, b: loss(p, b) / 0.0 * 0.0, optax.sgd(0.1), W0, (X, Y), num_steps=2)
    assert info.value.history == {}
    with pytest.raises(TrainingDiverged, match="step 0: w_norm"):
        train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=2, eval_fn=lambda p, b: {"w_norm": jnp.nan}, eval_data=None)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=10, eval_every=3), "eval_every"),
        (lambda: train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=10, batch_size=100), "batch_size"),
        (lambda: train(loss, optax.sgd(0.1), W0, (X, Y[:5]), num_steps=10), "data leaves"),
        (lambda: train(loss, optax.sgd(0.1), W0, (X[:0], Y[:0]), num_steps=10), "data is empty"),
        (lambda: train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=0), "num_steps"),
        (lambda: train(loss, optax.sgd(0.1), jax.tree.map(lambda a: a.astype(np.int32), W0), (X, Y), num_steps=1),
         "params leaf .* has dtype int32"),
        (lambda: train(None, optax.sgd(0.1), W0, (X, Y), num_steps=1), "objective must be a callable"),
        (lambda: train(loss, optax.sgd, W0, (X, Y), num_steps=1), "optimizer must be an optax"),
        (lambda: train(loss, optax.chain(noise_injection(optax.sgd(0.1), 0.1), optax.scale(2.0)), W0, (X, Y), num_steps=1),
         "outermost"),
        (lambda: train(loss, optax.sgd(0.1), init_state(W0, optax.sgd(0.1)), (X, Y), num_steps=1, key=1), "key and model_state"),
        (lambda: train(loss, optax.sgd(0.1), init_state(W0, optax.sgd(0.1)), (X, Y), num_steps=1, swa_start=0), "swa_start"),
        (lambda: sweep(loss, lambda sigma, seed: optax.sgd(0.1), W0, (X, Y), {"sigma": [-1.0]}, [0], num_steps=2), "sigma"),
        (lambda: sweep(loss, lambda sigma, seed: optax.sgd(0.1), W0, (X, Y), [0.1], [0], num_steps=2), "hyperparams must be"),
        (lambda: sweep(loss, lambda a, b, seed: optax.sgd(0.1), W0, (X, Y), {"a": [1.0], "b": [1.0, 2.0]}, [0], num_steps=2),
         "same length"),
        (lambda: sweep(loss, lambda sigma, seed: optax.sgd(0.1), W0, (X, Y), {"sigma": [0.1]}, [0.5], num_steps=2), "seeds"),
    ],
)
def test_bad_arguments_raise_naming_them(call, match):
    with pytest.raises(ValueError if "callable" not in match else TypeError, match=match):
        call()


_MULTI_DEVICE = DEVICE_TRAIN_PROBLEM + textwrap.dedent(
    """
    assert len(jax.devices()) == 4, jax.devices()
    from lsgeo.optim import noise_injection
    from lsgeo.train import train, sweep
    make = lambda sigma, seed: noise_injection(optax.sgd(0.1), sigma, seed=seed)
    one = [jax.devices()[0]]
    bs = int(sys.argv[1]) if len(sys.argv) > 1 else None
    a = train(loss, make(0.1, 1), W0, (X, Y), num_steps=6, eval_every=3, batch_size=bs)
    b = train(loss, make(0.1, 1), W0, (X, Y), num_steps=6, eval_every=3, batch_size=bs, devices=one)
    assert len(a.params["a"].sharding.device_set) == 4
    np.testing.assert_allclose(a.history["train_loss"], b.history["train_loss"], rtol=1e-5)
    for k in W0:
        np.testing.assert_allclose(a.params[k], b.params[k], atol=1e-5)
    grid = {"sigma": [0.0, 0.1]}
    s4 = sweep(loss, make, W0, (X, Y), grid, [0, 1], num_steps=4, eval_every=2)
    s1 = sweep(loss, make, W0, (X, Y), grid, [0, 1], num_steps=4, eval_every=2, devices=one)
    np.testing.assert_allclose(s4.history["train_loss"], s1.history["train_loss"], rtol=1e-5)
    print("OK")
    """
)


def _run_multi_device(*args):
    assert "OK" in run_python("-c", _MULTI_DEVICE, *args, devices=4, timeout=300)


def test_multi_device_matches_one_device():
    """Full-batch GD with the data sharded over 4 devices, and a sweep sharded over members."""
    _run_multi_device()


@pytest.mark.slow
def test_multi_device_minibatch_matches_one_device():
    _run_multi_device("8")
