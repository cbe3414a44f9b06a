"""lsgeo.dataplan: the layout of microbatches, the exact weighted reduction, the memory-bounded
data-set objective, sharding over 4 forced host devices (a subprocess) and bounded memory (a subprocess)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import last_json, run_python

from lsgeo import curvature, dataplan, risk

ONE_DEVICE = [jax.devices()[0]]


def _objective(w, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ w) - y) ** 2)


def _data(n=23):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3)), rng.standard_normal(n)


@pytest.mark.parametrize("n, size, layout", [(23, 5, (5, 4, 3)), (20, 5, (5, 4, 0)), (4, 10, (4, 1, 0))])
def test_plan_layout(n, size, layout):
    plan = dataplan.plan(_data(n), size, devices=ONE_DEVICE)
    assert (plan.size, plan.num_full, plan.remainder) == layout
    assert plan.num_examples == n and plan.num_microbatches == layout[1] + (layout[2] > 0)
    assert dataplan.plan(_data(n), None).whole


def test_reduce_and_objective_are_exact(x64):
    batch, w = _data(), np.array([0.3, -0.2, 0.5])
    plan = dataplan.plan(batch, 5, devices=ONE_DEVICE)  # 4 full microbatches + 3 examples
    value, grad = jax.jit(
        lambda w, b: dataplan.reduce(lambda p, mb: jax.value_and_grad(_objective)(p, mb), w, b, plan)
    )(w, batch)
    np.testing.assert_allclose(value, _objective(w, batch), rtol=1e-13)
    np.testing.assert_allclose(grad, jax.grad(_objective)(w, batch), rtol=1e-12)
    count = dataplan.reduce(lambda p, mb: jnp.asarray(mb[0].shape[0], jnp.float64), (), batch, plan, mean=False)
    assert float(count) == 23.0  # mean=False sums: every example counted once
    dataset_objective = dataplan.dataset_objective(_objective, plan)
    got = jax.jit(jax.value_and_grad(dataset_objective))(w, batch)
    np.testing.assert_allclose(got[0], value, rtol=1e-13)
    np.testing.assert_allclose(got[1], grad, rtol=1e-12)
    # vmapped over parameters (several points share one pass over the microbatches)
    ws = np.stack([w, 2 * w])
    np.testing.assert_allclose(jax.vmap(lambda p: dataset_objective(p, batch))(ws),
                               jax.vmap(lambda p: _objective(p, batch))(ws), rtol=1e-13)


BAD = [
    ({"microbatch_size": 0}, ValueError, "microbatch_size must be a positive integer"),
    ({"microbatch_size": -4}, ValueError, "microbatch_size must be a positive integer"),
    ({"microbatch_size": 2.0}, ValueError, "microbatch_size must be a positive integer"),
    ({"microbatch_size": True}, ValueError, "microbatch_size must be a positive integer"),
    ({"microbatch_size": "8"}, ValueError, "microbatch_size must be a positive integer"),
    ({"microbatch_size": 4, "devices": "cpu"}, ValueError, "devices must hold jax devices"),
    ({"microbatch_size": 4, "devices": []}, ValueError, "devices must hold at least one device"),
    ({"microbatch_size": 4, "devices": ONE_DEVICE * 2}, ValueError, "devices must not repeat a device"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_microbatch_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        curvature.hvp(_objective, np.ones(3), _data(), np.ones(3), **kwargs)


@pytest.mark.parametrize(
    "batch, message",
    [
        ((np.ones((5, 3)), np.ones(4)), r"batch leaves must share a leading example axis"),
        ((np.ones((0, 3)), np.ones(0)), "batch is empty"),
        ((np.ones((5, 3)), 1.0), "batch leaf .* has no leading example axis"),
    ],
)
def test_bad_batches_name_the_batch(batch, message):
    for call in (
        lambda: curvature.hessian_trace(_objective, np.ones(3), batch, jax.random.key(0), microbatch_size=2),
        lambda: risk.risk(lambda w, x: jnp.tanh(x @ w), lambda o, y: jnp.mean((o - y) ** 2), np.ones(3), batch,
                          microbatch_size=2),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_four_devices_give_the_single_device_values():
    """hvp, hessian_trace, top_eigenvalues, risk, gauss_newton_trace and ntk_trace with their microbatches
    sharded over a 4-device mesh (one all-reduce per product) equal the one-device values (float32)."""
    result = last_json(run_python("_dataplan_devices.py", devices=4))
    assert result["devices"] == 4 and result["all_reduce"]
    assert result["sharded_coupled_refused"]  # a batch-coupled objective on a sharded batch: a ValueError
    for name, error in result["errors"].items():
        assert error < 1e-5, (name, error)


def test_hessian_trace_of_8192_images_runs_in_the_memory_of_one_microbatch():
    """A 3-layer conv net on 8192 CIFAR-shaped images, microbatches of 256: a (compiled) call raises the
    process's RSS by a small fraction of what XLA says the whole batch at once needs (the runtime and the
    data are there before the call)."""
    result = last_json(run_python("_dataplan_memory.py", 8192, 256, 4, optimize=True))
    grew = result["rss_peak"] - result["rss_before"]
    print(f"peak RSS {result['rss_peak'] / 2**20:.0f} MiB during the call, {grew / 2**20:+.0f} MiB over the RSS "
          f"before it (first call {result['seconds']:.1f} s); the whole batch at once needs "
          f"{result['whole_batch_bytes'] / 2**20:.0f} MiB (XLA memory_analysis), the microbatched program "
          f"{result['microbatched_temp_bytes'] / 2**20:.0f} MiB of temporaries")
    assert np.isfinite(result["trace"])
    assert grew < 0.2 * result["whole_batch_bytes"]
    assert result["microbatched_temp_bytes"] < 0.1 * result["whole_batch_bytes"]
