"""Tests for lsgeo.train: the lax.scan training engine, SWA, SAM, divergence, sweeps, devices."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsgeo.optim import clean_params, noise_injection, perturbed_params
from lsgeo.train import TrainingDiverged, epoch_permutation, split_key, sweep, train

# inputs are built with numpy (eager jax ops would compile a kernel per shape)
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(16, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.1 * _RNG.normal(size=(16, 1))).astype(np.float32)
W0 = {"l1": {"w": (0.5 * _RNG.normal(size=(3, 4))).astype(np.float32)}, "l2": {"w": (0.5 * _RNG.normal(size=(4, 1))).astype(np.float32)}}


def loss(params, batch):
    x, y = batch
    return 0.5 * jnp.mean((jnp.tanh(x @ params["l1"]["w"]) @ params["l2"]["w"] - y) ** 2)


def eval_fn(params, batch):
    return {"test_loss": loss(params, batch), "w_norm": jnp.sum(params["l2"]["w"] ** 2)}


def _manual(opt, w0, batch_at, num_steps):
    """A hand-written loop with the documented contract; returns the clean iterates w_1..w_T."""

    @jax.jit
    def run(w0):
        state = opt.init(w0)
        z = perturbed_params(w0, state)

        def body(carry, t):
            z, state = carry
            updates, state = opt.update(jax.grad(loss)(z, batch_at(t)), state, z)
            z = optax.apply_updates(z, updates)
            return (z, state), clean_params(z, state)

        return jax.lax.scan(body, (z, state), jnp.arange(num_steps))[1]

    return run(w0)


def _at(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


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
    assert set(res.history) >= {"batch_loss", "w_norm", "swa_train_loss", "swa_test_loss"}
    # SWA: mean of w_6, w_8, w_10, w_12
    swa = jax.tree_util.tree_map(lambda a: np.mean(np.asarray(a)[[5, 7, 9, 11]], axis=0), traj)
    chex.assert_trees_all_close(res.swa_params, swa, atol=1e-6)


def test_minibatch_sgd_per_epoch_shuffling():
    opt = optax.sgd(0.05, momentum=0.5)
    res = train(loss, opt, W0, (X, Y), num_steps=12, eval_every=6, batch_size=4, key=5)
    _, data_key = split_key(5)
    perms = np.stack([np.asarray(epoch_permutation(data_key, e, 16)) for e in range(3)])
    assert all(sorted(p) == list(range(16)) for p in perms)
    idx = jnp.asarray(perms.reshape(-1, 4))  # step t uses batch t of the epoch-ordered permutations
    traj = _manual(opt, W0, lambda t: (jnp.asarray(X)[idx[t]], jnp.asarray(Y)[idx[t]]), 12)
    chex.assert_trees_all_close(res.params, _at(traj, -1), atol=1e-6)


def test_model_state_updated_at_perturbed_point_and_never_perturbed():
    def objective(params, state, batch):
        x, y = batch
        h = jnp.tanh(x @ params["l1"]["w"])
        new_state = {"mean": 0.5 * state["mean"] + 0.5 * jnp.mean(h, axis=0)}
        return 0.5 * jnp.mean((h @ params["l2"]["w"] - y) ** 2), new_state

    def ev(params, state, batch):
        return {"state_norm": jnp.sum(state["mean"] ** 2)}

    opt = noise_injection(optax.sgd(0.1), 0.3, mode="full", seed=1)
    ms0 = {"mean": np.zeros(4, np.float32)}
    res = train(objective, opt, W0, (X, Y), num_steps=1, model_state=ms0, eval_fn=ev, eval_data=None)
    z0 = jax.jit(lambda w: perturbed_params(w, opt.init(w)))(W0)
    expected = 0.5 * np.mean(np.tanh(X @ np.asarray(z0["l1"]["w"])), axis=0)
    np.testing.assert_allclose(res.model_state["mean"], expected, rtol=1e-5)
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


def test_sam_opaque_and_transparent():
    lr, rho = 0.1, 0.05
    ref = jax.jit(lambda w: _manual_sam(w, lr, rho, 3))(W0)
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    opaque = train(loss, optax.contrib.sam(optax.sgd(lr), adv, opaque_mode=True), W0, (X, Y), num_steps=3)
    chex.assert_trees_all_close(opaque.params, ref, atol=1e-6)
    transparent = train(loss, optax.contrib.sam(optax.sgd(lr), adv), W0, (X, Y), num_steps=6, eval_every=1)
    chex.assert_trees_all_close(transparent.params, ref, atol=1e-6)
    # between syncs the loop holds the adversarial point; evaluation uses the outer iterate
    tl = transparent.history["train_loss"]
    np.testing.assert_allclose(tl[1], tl[0], rtol=1e-6)


def test_divergence_names_step_and_quantity_and_keeps_history():
    with pytest.raises(TrainingDiverged) as info:
        train(loss, optax.sgd(300.0), W0, (X, Y), num_steps=200, eval_every=2)
    err = info.value
    assert err.quantity in ("loss", "gradient", "params", "train_loss") and err.step > 0
    assert f"step {err.step}" in str(err) and err.quantity in str(err)
    h = err.history
    assert len(h["step"]) >= 1 and h["step"][-1] <= err.step
    assert np.all(np.isfinite(h["train_loss"]))


def test_sweep_matches_separate_runs_and_compiles_once():
    sigmas = np.linspace(0.0, 0.35, 8)
    traces = []

    def counted_loss(params, batch):
        traces.append(1)
        return loss(params, batch)

    def make(sigma, seed):
        return noise_injection(optax.sgd(0.1), sigma, mode="layerwise", seed=seed)

    kw = dict(num_steps=10, eval_every=5)
    res = sweep(counted_loss, make, W0, (X, Y), sigmas, [4], members_per_chunk=4, **kw)
    first = len(traces)
    assert first <= 4  # init + chunk (step and evaluation); independent of the 8 sigmas
    res2 = sweep(counted_loss, make, W0, (X, Y), sigmas[::-1], [4], members_per_chunk=4, **kw)
    assert len(traces) == first  # new sigma values: no retrace, no recompilation
    assert res.history["train_loss"].shape == (8, 1, 3)
    np.testing.assert_array_equal(res.diverged_step, -1)
    # the 8 runs one after another, not vmapped (one compilation, sigma traced)
    run = jax.jit(lambda s: _manual(make(s, 4), W0, lambda t: (X, Y), 10))
    for i, s in enumerate(sigmas):
        traj = run(jnp.float32(s))
        chex.assert_trees_all_close(_at(_at(res.params, i), 0), _at(traj, -1), atol=2e-6, rtol=1e-5)
        losses = [float(loss(_at(traj, k), (X, Y))) for k in (4, 9)]
        np.testing.assert_allclose(res.history["train_loss"][i, 0, 1:], losses, rtol=1e-5)
    chex.assert_trees_all_close(_at(_at(res2.params, 7), 0), _at(_at(res.params, 0), 0), atol=2e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="eval_every"):
        train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=10, eval_every=3)
    with pytest.raises(ValueError, match="batch_size"):
        train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=10, batch_size=100)
    with pytest.raises(ValueError, match="data"):
        train(loss, optax.sgd(0.1), W0, (X, Y[:5]), num_steps=10)
    with pytest.raises(ValueError, match="sigmas"):
        sweep(loss, lambda s, k: optax.sgd(0.1), W0, (X, Y), [-1.0], [0], num_steps=2)


_MULTI_DEVICE = textwrap.dedent(
    """
    import sys, jax, numpy as np, optax
    assert len(jax.devices()) == 4, jax.devices()
    from lsgeo.optim import noise_injection
    from lsgeo.train import train, sweep
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 3)).astype(np.float32); Y = rng.normal(size=(16, 1)).astype(np.float32)
    W0 = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4, 1)).astype(np.float32)}
    def loss(p, b):
        x, y = b
        return 0.5 * ((np.float32(1) * jax.numpy.tanh(x @ p["a"]) @ p["b"] - y) ** 2).mean()
    make = lambda s, k: noise_injection(optax.sgd(0.1), s, seed=k)
    one = [jax.devices()[0]]
    bs = int(sys.argv[1]) if len(sys.argv) > 1 else None
    a = train(loss, make(0.1, 1), W0, (X, Y), num_steps=6, eval_every=3, batch_size=bs)
    b = train(loss, make(0.1, 1), W0, (X, Y), num_steps=6, eval_every=3, batch_size=bs, devices=one)
    assert len(a.params["a"].sharding.device_set) == 4
    np.testing.assert_allclose(a.history["train_loss"], b.history["train_loss"], rtol=1e-5)
    for k in W0:
        np.testing.assert_allclose(a.params[k], b.params[k], atol=1e-5)
    s4 = sweep(loss, make, W0, (X, Y), [0.0, 0.1], [0, 1], num_steps=4, eval_every=2)
    s1 = sweep(loss, make, W0, (X, Y), [0.0, 0.1], [0, 1], num_steps=4, eval_every=2, devices=one)
    np.testing.assert_allclose(s4.history["train_loss"], s1.history["train_loss"], rtol=1e-5)
    print("OK")
    """
)


def _run_multi_device(*args):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_multi_device_matches_one_device():
    """Full-batch GD with the data sharded over 4 devices, and a sweep sharded over members."""
    _run_multi_device()


@pytest.mark.slow
def test_multi_device_minibatch_matches_one_device():
    _run_multi_device("8")
