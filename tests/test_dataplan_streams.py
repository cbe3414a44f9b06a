"""Data sources: a zero-argument callable returning a fresh iterator of batches, read one batch at a time on
every product (lsgeo.dataplan.stream_plan). Products and estimates from a numpy memmap on disk equal the
in-memory values exactly; the device never holds more than one batch; a source that changes between passes
is an error, not a wrongly weighted product."""

import jax
import numpy as np
import pytest
from conftest import ce_objective, mlp_apply, mlp_init

from lsgeo import curvature, losses

N, BATCH = 70, 16  # 4 batches of 16 and a last one of 6


@pytest.fixture
def on_disk(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((N, 5)))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, size=N))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")  # read from disk batch by batch, never held whole
    y = np.load(tmp_path / "y.npy", mmap_mode="r")

    def source():
        for start in range(0, N, BATCH):
            yield np.asarray(x[start : start + BATCH]), np.asarray(y[start : start + BATCH])

    return source, (np.asarray(x), np.asarray(y))


def test_a_stream_from_disk_gives_the_in_memory_values(global_x64, on_disk):
    source, batch = on_disk
    params = mlp_init(0, (5, 7, 3))
    f = ce_objective(mlp_apply)
    streamed = curvature.Hessian(f, params, source)
    in_memory = curvature.Hessian(f, params, batch, microbatch_size=BATCH)
    assert streamed.plan.num_examples == N and streamed.plan.remainder == N % BATCH
    u = np.random.default_rng(1).standard_normal((3, streamed.size))
    np.testing.assert_allclose(streamed @ u, in_memory @ u, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(streamed @ u, curvature.Hessian(f, params, batch) @ u, rtol=1e-10, atol=1e-14)
    key = jax.random.key(2)
    np.testing.assert_allclose(curvature.top_eigenvalues(streamed, key, k=2, num_iters=20),
                               curvature.top_eigenvalues(in_memory, key, k=2, num_iters=20), rtol=1e-10)
    np.testing.assert_allclose(curvature.hessian_trace(streamed, key, num_probes=6),
                               curvature.hessian_trace(in_memory, key, num_probes=6), rtol=1e-10)
    np.testing.assert_allclose(curvature.slq_nodes(streamed, key, num_iters=6, num_runs=2)[0],
                               curvature.slq_nodes(in_memory, key, num_iters=6, num_runs=2)[0], rtol=1e-10)
    gn_streamed = curvature.GaussNewton(mlp_apply, losses.softmax_cross_entropy, params, source)
    gn = curvature.GaussNewton(mlp_apply, losses.softmax_cross_entropy, params, batch)
    np.testing.assert_allclose(gn_streamed @ u, gn @ u, rtol=1e-10, atol=1e-14)


def test_the_device_holds_one_batch_at_a_time(on_disk):
    source, _ = on_disk
    params = mlp_init(0, (5, 7, 3))
    op = curvature.Hessian(ce_objective(mlp_apply), params, source)
    assert op.data is None  # nothing of the data set is an operand
    shapes = [np.shape(a) for a in jax.tree_util.tree_leaves(op)]
    assert all(s == np.shape(a) for s, a in zip(shapes, jax.tree_util.tree_leaves(params)))
    hlo = jax.jit(lambda o, u: o.matvec(u)).lower(op, np.ones(op.size)).as_text()
    assert f"tensor<{N}x" not in hlo and f"tensor<{BATCH}x5x" in hlo  # batches of 16 only


def test_a_source_that_changes_between_passes_is_an_error(on_disk):
    source, batch = on_disk
    passes = []

    def shrinking():  # the second pass drops the last batch
        passes.append(None)
        stop = N if len(passes) == 1 else N - N % BATCH
        for start in range(0, stop, BATCH):
            yield batch[0][start : min(start + BATCH, stop)], batch[1][start : min(start + BATCH, stop)]

    op = curvature.Hessian(ce_objective(mlp_apply), mlp_init(0, (5, 7, 3)), shrinking)
    with pytest.raises(Exception, match="a source must yield the same batches on every pass"):
        jax.block_until_ready(op @ np.ones(op.size, np.float32))


@pytest.mark.parametrize("make_source, message", [
    (lambda b: (lambda: iter([])), "yielded no batch"),
    (lambda b: (lambda: iter([(b[0][:4], b[1][:4]), (b[0][:3], b[1][:3]), (b[0][:4], b[1][:4])])),
     "only the last batch may be smaller"),
    (lambda b: (lambda: iter([(b[0][:4], b[1][:4]), (b[0][:4, :2], b[1][:4])])), "differs from batch 0: leaf .* has trailing shape"),
])
def test_bad_sources_name_the_batch(on_disk, make_source, message):
    _, batch = on_disk
    with pytest.raises(ValueError, match=message):
        curvature.Hessian(ce_objective(mlp_apply), mlp_init(0, (5, 7, 3)), make_source(batch))


def test_a_source_takes_no_microbatch_size(on_disk):
    source, _ = on_disk
    with pytest.raises(ValueError, match="microbatch_size must be None when batch is a data source"):
        curvature.Hessian(ce_objective(mlp_apply), mlp_init(0, (5, 7, 3)), source, microbatch_size=4)
    with pytest.raises(ValueError, match="MonteCarloFisher takes an in-memory batch"):
        curvature.MonteCarloFisher(mlp_apply, losses.softmax_cross_entropy, mlp_init(0, (5, 7, 3)), source,
                                   jax.random.key(0))
