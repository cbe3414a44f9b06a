"""lsgeo.Objective / lsgeo.Risk: built once (plan, checks), a pytree, the one way in for operators and geometry.
Each test below failed (wrong number, obscure error or crash) before the objective existed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lsgeo
from lsgeo import curvature, dataplan, landscape, losses, sharpness

ONE = [jax.devices()[0]]


def _mse(w, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ w) - y) ** 2)


def _coupled(w, batch):
    """Not a mean over examples: the batch's own mean enters every example (as BatchNorm in training mode)."""
    x, y = batch
    h = x @ w
    return jnp.mean((h - jnp.mean(h)) ** 2 + y)


def _data(n=6, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal(n)


def _source(batch, size):
    x, y = batch
    return lambda: ((x[i : i + size], y[i : i + size]) for i in range(0, len(y), size))


def test_objective_is_a_pytree_with_the_data_set_value_and_gradient(x64):
    batch, w = _data(11), np.array([0.3, -0.2, 0.5])
    obj = lsgeo.Objective(_mse, batch, microbatch_size=4, devices=ONE)
    value, grad = jax.jit(lambda o, p: o.value_and_grad(p))(obj, w)
    np.testing.assert_allclose(value, _mse(w, batch), rtol=1e-13)
    np.testing.assert_allclose(grad, jax.grad(_mse)(w, batch), rtol=1e-12)
    count = obj.map(lambda ops, mb: jnp.asarray(mb[0].shape[0], jnp.float64), (), mean=False)
    assert float(count) == 11.0
    assert jax.tree_util.tree_structure(obj).num_leaves == 2  # the data; f and the plan are static


def test_operators_from_an_objective_equal_the_positional_forms(x64):
    batch, w = _data(7), np.array([0.3, -0.2, 0.5])
    predict = lambda p, x: jnp.tanh(x @ p)  # noqa: E731
    dense = jax.hessian(_mse)(w, batch)
    np.testing.assert_allclose(curvature.Hessian(lsgeo.Objective(_mse, batch), w).to_dense(), dense, rtol=1e-12)
    np.testing.assert_allclose(curvature.Hessian(_mse, w, batch, microbatch_size=3).to_dense(), dense, rtol=1e-12)
    risk = lsgeo.Risk(predict, losses.squared_loss, batch, microbatch_size=3)
    np.testing.assert_allclose(curvature.GaussNewton(risk, w).to_dense(),
                               curvature.GaussNewton(predict, losses.squared_loss, w, batch).to_dense(), rtol=1e-12)
    with pytest.raises(ValueError, match="built from a Risk"):
        curvature.GaussNewton(lsgeo.Objective(_mse, batch), w)


def test_top_eigenvalues_of_an_objective_that_ignores_its_batch():
    f = lambda w, _: jnp.sum(jnp.array([3.0, 2.0, 1.0]) * w**2) / 2  # noqa: E731
    values = curvature.top_eigenvalues(f, jnp.ones(3), None, jax.random.key(0), k=2)
    np.testing.assert_allclose(values, [3.0, 2.0], rtol=1e-5)


def test_replace_data_rebuilds_the_plan(x64):
    a, b, w = _data(8, seed=0), _data(5, seed=1), np.array([0.3, -0.2, 0.5])
    op = curvature.Hessian(_mse, w, a, microbatch_size=3)
    moved = op.replace(data=b)
    assert moved.plan.num_examples == 5
    np.testing.assert_allclose(moved.to_dense(), jax.hessian(_mse)(w, b), rtol=1e-12)


@pytest.mark.parametrize("size", [4, 2])  # one full microbatch + a remainder; two full
def test_batch_coupled_objective_is_refused_with_microbatches(size):
    batch, w = _data(6), np.array([0.3, -0.2, 0.5])
    for call in (
        lambda: curvature.Hessian(_coupled, w, batch, microbatch_size=size),
        lambda: landscape.slice_1d(_coupled, w, batch, w, jnp.array([1.0, 2.0]), microbatch_size=size),
        lambda: landscape.slice_2d(_coupled, w, batch, w, w, jnp.array([1.0]), jnp.array([1.0]), microbatch_size=size),
        lambda: sharpness.epsilon_sharpness(_coupled, w, batch, 0.1, key=jax.random.key(0), microbatch_size=size),
        lambda: sharpness.average_sharpness(_coupled, w, batch, 0.1, jax.random.key(0), microbatch_size=size),
    ):
        with pytest.raises(ValueError, match="not a mean over independent examples.*microbatch_size=None"):
            call()


def test_slice_on_a_data_source_equals_the_in_memory_slice(global_x64):
    batch, w = _data(10), np.array([0.3, -0.2, 0.5])
    d, alphas = np.array([1.0, 0.0, -1.0]), jnp.array([0.0, 0.5, 1.0])
    expected = landscape.slice_1d(_mse, w, batch, d, alphas)
    streamed = landscape.slice_1d(_mse, w, _source(batch, 4), d, alphas)
    by_objective = landscape.slice_1d(lsgeo.Objective(_mse, _source(batch, 4)), w, None, d, alphas)
    np.testing.assert_allclose(streamed, expected, rtol=1e-12)
    np.testing.assert_allclose(by_objective, expected, rtol=1e-12)
    surface = landscape.slice_2d(_mse, w, _source(batch, 3), d, w, alphas, alphas[:2])
    np.testing.assert_allclose(surface, landscape.slice_2d(_mse, w, batch, d, w, alphas, alphas[:2]), rtol=1e-12)


def test_data_source_errors_are_the_users():
    batch, w = _data(8), np.array([0.3, -0.2, 0.5], np.float32)
    gen = _source(batch, 4)
    with pytest.raises(ValueError, match="iterator .* pass the generator function itself"):
        curvature.Hessian(_mse, w, gen())
    passes = []

    def changing():  # another permutation on every pass: augmentation
        passes.append(None)
        x, y = batch
        order = np.random.default_rng(len(passes)).permutation(8)
        return ((x[order][i : i + 4], y[order][i : i + 4]) for i in range(0, 8, 4))

    op = curvature.Hessian(_mse, w, changing)
    with pytest.raises(dataplan.SourceChanged, match="another batch 0 than on its first pass: its contents differ"):
        op @ w


def _changing(batch, size):
    """A source that draws another permutation on every pass (augmentation)."""
    x, y = batch
    passes = []

    def source():
        passes.append(None)
        order = np.random.default_rng(len(passes)).permutation(len(y))
        return ((x[order][i : i + size], y[order][i : i + size]) for i in range(0, len(y), size))

    return source


def _failing(batch, size, good_passes):
    """A source whose file goes away after ``good_passes`` passes (the build; for a Risk, its label check)."""
    x, y = batch
    passes = []

    def source():
        passes.append(None)
        if len(passes) > good_passes:
            raise OSError("the data file went away")
        return ((x[i : i + size], y[i : i + size]) for i in range(0, len(y), size))

    return source


_ON_DATA = {  # every public entry point that evaluates on data, by kind
    "slice_1d": lambda data, w: landscape.slice_1d(_mse, w, data, w, jnp.array([0.0, 1.0, 2.0])),
    "epsilon_sharpness": lambda data, w: sharpness.epsilon_sharpness(_mse, w, data, 0.1, steps=2),
    "risk": lambda data, w: lsgeo.risk.risk(_predict, losses.squared_loss, w, data),
    "tracker": lambda data, w: lsgeo.train.train(
        _mse, __import__("optax").sgd(0.1), w, _data(8), num_steps=1,
        measure=curvature.track.top_eigenvalue_tracker(_mse, k=1, num_iters=3), measure_data=data),
}


@pytest.mark.parametrize("entry", list(_ON_DATA))
def test_every_entry_point_raises_the_sources_own_error(entry, global_x64):
    batch, w = _data(8), np.array([0.3, -0.2, 0.5])
    run = _ON_DATA[entry]
    with pytest.raises(ValueError, match="iterator .* pass the generator function itself"):
        run(_source(batch, 4)(), w)
    with pytest.raises(dataplan.SourceChanged, match="another batch 0 than on its first pass"):
        run(_changing(batch, 4), w)
    with pytest.raises(OSError, match="the data file went away"):
        run(_failing(batch, 4, good_passes=1), w)  # when the data are first read again
    with pytest.raises(OSError, match="the data file went away"):  # a pass inside the compiled program
        run(_failing(batch, 4, good_passes={"risk": 2, "tracker": 5}.get(entry, 1)), w)


def test_float64_source_under_x64(global_x64):
    batch, w = _data(8), np.array([0.3, -0.2, 0.5])
    op = curvature.Hessian(_mse, w, _source(batch, 3))
    np.testing.assert_allclose(op.to_dense(), jax.hessian(_mse)(w, batch), rtol=1e-12)


def test_risk_checks_labels_of_every_data_form():
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1, 2, 1])  # 3 is outside [0, 3)
    predict = lambda p, x: x @ p  # noqa: E731
    w = np.ones((3, 3), np.float32)
    for data in ((x, y), _source((x, y), 3)):
        with pytest.raises(ValueError, match=r"in \[0, 3\)"):
            curvature.GaussNewton(predict, losses.softmax_cross_entropy, w, data)


def test_operator_errors_say_what_was_wrong():
    batch, w = _data(6), {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    f = lambda p, b: jnp.mean(jnp.tanh(b[0] @ p["a"])) + jnp.sum(p["b"] ** 2)  # noqa: E731
    op = curvature.Hessian(f, w, batch)
    with pytest.raises(ValueError, match="a tuple of leaves is not a parameter tree"):
        op @ (np.ones(3), np.ones(2))
    block = curvature.blocks(op, "leaf")["a"] if "a" in curvature.blocks(op, "leaf") else next(iter(curvature.blocks(op).values()))
    with pytest.raises(ValueError, match="is a block of 1 of the 2 parameter leaves"):
        block @ w
    with pytest.raises(ValueError, match="params"):
        op.replace(params=3)
    with pytest.raises(ValueError, match="predict must return an array"):
        curvature.GaussNewton(lambda p, x: {"out": x @ p["a"]}, losses.squared_loss, w, (batch[0], batch[1]))


def _predict(w, x):
    return jnp.tanh(x @ w)


def _coupled_predict(w, x):
    h = x @ w
    return h - jnp.mean(h, axis=0)  # the batch's own mean: BatchNorm in training mode


def test_gauss_newton_trace_and_diagonal_have_one_implementation(x64):
    from lsgeo import risk as risk_lib

    batch, w = _data(9), np.array([0.3, -0.2, 0.5])
    op = curvature.GaussNewton(_predict, losses.squared_loss, w, batch, microbatch_size=4)
    dense = op.to_dense()
    by_risk = risk_lib.gauss_newton_trace(_predict, losses.squared_loss, w, batch, microbatch_size=4)
    assert float(by_risk) == float(op.exact_trace())  # the same code path: equal to the last bit
    np.testing.assert_allclose(by_risk, jnp.trace(dense), rtol=1e-12)
    diagonal = risk_lib.gauss_newton_diagonal(_predict, losses.squared_loss, w, batch, microbatch_size=4)
    np.testing.assert_array_equal(diagonal, op.exact_diagonal())
    np.testing.assert_allclose(diagonal, jnp.diag(dense), rtol=1e-12)
    risk = lsgeo.Risk(_predict, losses.squared_loss, batch, microbatch_size=4)
    assert float(risk_lib.gauss_newton_trace(risk, params=w)) == float(by_risk)


def test_risk_functions_refuse_a_batch_coupled_model_with_microbatches():
    from lsgeo import risk as risk_lib

    batch, w, key = _data(6), np.array([0.3, -0.2, 0.5]), jax.random.key(0)
    loss = losses.squared_loss
    for call in (
        lambda: risk_lib.risk(_coupled_predict, loss, w, batch, microbatch_size=4),
        lambda: risk_lib.perturbed_risk(_coupled_predict, loss, w, batch, 0.1, key, microbatch_size=4),
        lambda: risk_lib.effective_risk(_coupled_predict, loss, w, batch, 0.1, microbatch_size=4),
        lambda: risk_lib.gauss_newton_trace(_coupled_predict, loss, w, batch, microbatch_size=2),
        lambda: risk_lib.gauss_newton_diagonal(_coupled_predict, loss, w, batch, microbatch_size=2),
    ):
        with pytest.raises(ValueError, match="not a mean over independent examples.*microbatch_size=None"):
            call()


def test_risk_functions_on_a_data_source_equal_the_in_memory_values(global_x64):
    from lsgeo import risk as risk_lib

    batch, w, key = _data(10), np.array([0.3, -0.2, 0.5]), jax.random.key(1)
    source, loss = _source(batch, 4), losses.squared_loss
    for name, call in {
        "risk": lambda b: risk_lib.risk(_predict, loss, w, b),
        "perturbed": lambda b: risk_lib.perturbed_risk(_predict, loss, w, b, 0.1, key, num_samples=3),
        "effective": lambda b: risk_lib.effective_risk(_predict, loss, w, b, 0.1),
        "trace": lambda b: risk_lib.gauss_newton_trace(_predict, loss, w, b),
        "diagonal": lambda b: risk_lib.gauss_newton_diagonal(_predict, loss, w, b),
    }.items():
        np.testing.assert_allclose(call(source), call(batch), rtol=1e-12, err_msg=name)


def test_ntk_trace_refuses_coupled_predict_and_reads_sources(global_x64):
    from lsgeo import ntk

    x, w = _data(10)[0], np.array([[0.3, 0.1], [-0.2, 0.4], [0.5, -0.3]])
    predict = lambda p, x: jnp.tanh(x @ p)  # noqa: E731
    with pytest.raises(ValueError, match="not a mean over independent examples"):
        ntk.ntk_trace(lambda p, x: _coupled_predict(p, x), w, x, microbatch_size=4)
    expected = ntk.ntk_trace(predict, w, x)
    np.testing.assert_allclose(ntk.ntk_trace(predict, w, lambda: (x[i : i + 4] for i in range(0, 10, 4))), expected,
                               rtol=1e-12)
    risk = lsgeo.Risk(predict, losses.squared_loss, (x, np.zeros((10, 2))), microbatch_size=3)
    np.testing.assert_allclose(ntk.ntk_trace(risk, w, None), expected, rtol=1e-12)


def test_groups_returning_a_list_is_refused():
    op = curvature.Hessian(lambda p, b: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2), {"a": jnp.ones(2), "b": jnp.ones(1)},
                           None)
    with pytest.raises(ValueError, match=r"groups\(path\) must return a group name .* returned list"):
        curvature.blocks(op, lambda path: list(path))


def test_monte_carlo_fisher_replace_data_draws_for_the_new_examples(x64):
    a, b, w = _data(8, seed=0), _data(5, seed=1), np.array([0.3, -0.2, 0.5])
    op = curvature.MonteCarloFisher(_predict, losses.squared_loss, w, a, jax.random.key(0), num_samples=2)
    fresh = curvature.MonteCarloFisher(_predict, losses.squared_loss, w, b, jax.random.key(0), num_samples=2)
    np.testing.assert_allclose(op.replace(data=b).to_dense(), fresh.to_dense(), rtol=1e-12)


def test_a_sum_over_examples_is_refused_on_a_whole_batch(x64):
    """A summed loss used whole (no microbatches) made EmpiricalFisher n^2 too large without an error."""
    batch, w = _data(6), np.array([0.3, -0.2, 0.5])
    summed = lambda out, y: jnp.sum((out - y) ** 2) / 2  # noqa: E731 (a sum over examples, not a mean)
    with pytest.raises(ValueError, match="not a mean over examples: .* a sum doubles.*jnp.mean instead of jnp.sum"):
        curvature.EmpiricalFisher(_predict, summed, w, batch)
    with pytest.raises(ValueError, match="not a mean over examples"):
        curvature.Hessian(lambda p, b: jnp.sum((jnp.tanh(b[0] @ p) - b[1]) ** 2), w, batch)
    fisher = curvature.EmpiricalFisher(_predict, losses.squared_loss, w, batch).to_dense()  # the mean passes
    per_example = jax.vmap(jax.grad(lambda p, x, y: losses.squared_loss(_predict(p, x[None]), y[None])),
                           in_axes=(None, 0, 0))(w, *batch)
    np.testing.assert_allclose(fisher, per_example.T @ per_example / 6, rtol=1e-12)
    curvature.Hessian(_coupled, w, batch)  # a batch-coupled mean, used whole: nothing to refuse


def test_a_sum_or_a_coupling_is_refused_without_two_in_memory_microbatches(x64):
    """Found by scripts/hostile_objective.py: a summed objective with one microbatch holding every example
    (microbatch_size >= n), a summed or batch-coupled objective on a data source (its batches are its
    microbatches), and an objective that returns a vector gave numbers without an error."""
    batch, w = _data(7), np.array([0.3, -0.2, 0.5])
    summed = lambda p, b: jnp.sum((jnp.tanh(b[0] @ p) - b[1]) ** 2)  # noqa: E731
    mean = lambda p, b: jnp.mean((jnp.tanh(b[0] @ p) - b[1]) ** 2)  # noqa: E731
    for microbatch_size in (7, 8):
        with pytest.raises(ValueError, match="not a mean over examples"):
            curvature.Hessian(summed, w, batch, microbatch_size=microbatch_size)
    source = lambda: iter([jax.tree_util.tree_map(lambda a: a[:4], batch),  # noqa: E731
                           jax.tree_util.tree_map(lambda a: a[4:], batch)])
    for f in (summed, _coupled):
        with pytest.raises(ValueError, match="not a mean over"):
            landscape.slice_1d(f, w, source, w, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(curvature.Hessian(mean, w, source).to_dense(),  # control: a mean on the source passes
                               jax.hessian(mean)(w, batch), rtol=1e-10)
    vector = lambda p, b: (jnp.tanh(b[0] @ p) - b[1]) ** 2  # noqa: E731
    with pytest.raises(ValueError, match="must return a scalar"):
        landscape.slice_1d(vector, w, batch, w, jnp.array([0.0, 1.0]))
