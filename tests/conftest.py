"""Shared test set-up.

The suite is dominated by XLA compile time on tiny models, so it compiles at backend optimisation
level 0 (set before jax initialises its backend; subprocesses and notebook kernels inherit it).
Tests that compare to 1e-10 use the ``x64`` fixture (float64 inside the test only).

Each test process gets its own lsgeo cache folder (``LSGEO_CACHE_DIR``, inherited by subprocesses), so that
two pytest-xdist workers never write one folder at once (nor the user's ~/.cache).

Memory maps: every XLA:CPU executable maps its code and data as separate regions (13 for a tiny function, one
set per kernel), and the kernel refuses a process more than ``vm.max_map_count`` (65530 by default) regions.
A worker that compiles ~1,000 tests' programs crosses it after ~14 minutes, and LLVM then fails ("LLVM
compilation error: Cannot allocate memory") and segfaults: the intermittent worker crash of 2026-12-07, shown
by pre-filling a process's maps (scripts/xla_map_limit.py). After each test, a process past half the limit
drops JAX's compiled programs (``jax.clear_caches``), which unmaps them (test_conftest.py checks that it does).
"""

import atexit
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ["LSGEO_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"lsgeo-cache-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, os.environ["LSGEO_CACHE_DIR"], ignore_errors=True)

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_python(*args, devices: int | None = None, optimize: bool = False, timeout: float = 600) -> str:
    """Runs ``python *args`` (a script in tests/ by name, or ``"-c", code``) in a fresh interpreter on the CPU and
    returns its stdout; a non-zero exit fails the test with the end of its stderr. ``devices``: forced host devices
    (the device count is fixed when jax starts, hence the subprocess); ``optimize``: full XLA optimisation (where
    run time, not compile time, dominates). The repository root is on ``PYTHONPATH``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.path.dirname(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    flags = env.get("XLA_FLAGS", "").split()
    if optimize:
        flags = [f for f in flags if "optimization_level" not in f and "expensive_passes" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    script = [args[0] if args[0] == "-c" else os.path.join(TESTS, str(args[0]))]
    out = subprocess.run([sys.executable, *script, *map(str, args[1:])], env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def last_json(stdout: str):
    """The JSON object on the last line of a script's output (how the device scripts report)."""
    return json.loads(stdout.strip().splitlines()[-1])


def rounding_floor(scale, dtype=None, factor: float = 64.0):
    """The arithmetic's own precision as a floor under a statistical bound: ``factor * eps * |scale|`` with
    ``scale`` the magnitude the compared quantity is accumulated from (``sum |A_ij|`` for a trace, the row
    sums ``sum_j |A_ij|`` for a diagonal). A bound of ``c * stderr`` alone fails where an estimator is exact
    (XTrace on a low-rank operator: stderr 3.5e-16, the reference's rounding 1.8e-15); eps is float64's unless
    x64 is off (float32) or ``dtype`` is given."""
    if dtype is None:
        dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    return factor * np.finfo(dtype).eps * np.abs(np.asarray(scale, np.float64))


def pytest_configure(config):
    """JAX attributes "core.Jaxpr is missing a DebugInfo" to its own module (jax._src.linear_util), so it is matched
    by its message: lsgeo's jaxprs carry a DebugInfo (lsgeo.jaxpr_interpreter) wherever JAX offers the public
    ``jax.extend.core.DebugInfo`` (not jax 0.8.1, the floor), and there a jaxpr built without one fails the suite."""
    import jax.extend.core  # noqa: PLC0415

    if getattr(jax.extend.core, "DebugInfo", None) is not None:
        config.addinivalue_line("filterwarnings", "error:core.Jaxpr is missing a DebugInfo object:DeprecationWarning")


def _slow_test_ids() -> set[str]:
    with open(os.path.join(TESTS, "slow_tests.txt")) as listed:
        return {line.split()[1] for line in listed if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    """Marks ``slow`` the tests listed in tests/slow_tests.txt (measured, with their seconds): the README command
    (``-m "not slow"``) then runs in under 10 minutes on 2 cores."""
    slow = _slow_test_ids()
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)


def mapped_regions() -> int:
    """How many memory regions this process maps (lines of /proc/self/maps; 0 where there is no /proc)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 65530


MAPS_BEFORE_CLEARING = _max_map_count() // 2


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """After a test, drop JAX's compiled programs once the process maps half the kernel's limit (module doc)."""
    yield
    if mapped_regions() > MAPS_BEFORE_CLEARING:
        jax.clear_caches()
        gc.collect()


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def global_x64():
    """float64 set globally, not by the thread-local ``jax.enable_x64`` context: a stream's batches arrive
    through a host callback that XLA may run on another thread, where the context does not reach."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# Tiny models shared by the curvature, risk, NTK and microbatching tests: a tanh MLP (a list of
# {"w", "b"} dicts) and a small CNN (lax.conv_general_dilated), with numpy float64 parameters (no eager
# JAX work at import; cast with jnp.asarray(..., jnp.float32) where float32 is wanted), and the dense
# references they are compared with. Import them with `from conftest import ...`.

import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402


def mlp_init(seed, sizes):
    """Parameters of a tanh MLP as a list of {"w", "b"} dicts (numpy float64)."""
    rng = np.random.default_rng(seed)
    return [
        {"w": rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), "b": 0.1 * rng.standard_normal(d_out)}
        for d_in, d_out in zip(sizes[:-1], sizes[1:])
    ]


def mlp_apply(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


def cnn_init(seed, channels=3, classes=3):
    """A 3x3 conv (1 -> ``channels``, valid) + tanh + dense head on [n, 6, 6, 1] images (numpy float64)."""
    rng = np.random.default_rng(seed)
    return {
        "conv": {"w": rng.standard_normal((3, 3, 1, channels)) / 3.0, "b": np.full((channels,), 0.1)},
        "dense": {"w": rng.standard_normal((16 * channels, classes)) / 7.0, "b": 0.1 * rng.standard_normal(classes)},
    }


def cnn_apply(params, x):  # x: [n, 6, 6, 1] -> conv 3x3 stride 1 valid -> [n, 4, 4, c] -> dense -> [n, k]
    h = jax.lax.conv_general_dilated(
        x, params["conv"]["w"], window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h + params["conv"]["b"]).reshape(x.shape[0], -1)
    return h @ params["dense"]["w"] + params["dense"]["b"]


def sq_objective(predict):
    """f(params, (x, y)) = squared loss of ``predict``."""
    from lsgeo import losses

    def f(params, batch):
        x, y = batch
        return losses.squared_loss(predict(params, x), y)

    return f


def ce_objective(predict):
    """f(params, (x, y)) = softmax cross-entropy of ``predict``."""
    from lsgeo import losses

    def f(params, batch):
        x, y = batch
        return losses.softmax_cross_entropy(predict(params, x), y)

    return f


def regression_batch(seed, n, d_in, k_out):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d_in)), rng.standard_normal((n, k_out))


def image_batch(seed, n, classes=3):
    """[n, 6, 6, 1] images and integer labels for ``cnn_apply``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6, 6, 1)), rng.integers(0, classes, size=n)


def random_tree(seed, params):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(np.shape(a)), params)


def flat(tree):
    """Flattened leaves, in the order of jax.flatten_util.ravel_pytree (jax.tree_util flattening order)."""
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


@functools.partial(jax.jit, static_argnums=0)
def dense_hessian(f, params, batch):
    """The reference: jax.hessian of f on the flattened parameters."""
    w, unravel = ravel_pytree(params)
    return jax.hessian(lambda w: f(unravel(w), batch))(w)


@functools.partial(jax.jit, static_argnums=0)
def dense_jacobian(predict, params, x):
    """The reference Jacobian of the outputs as [n k, m]."""
    w, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda w: jnp.reshape(predict(unravel(w), x), (x.shape[0], -1)))(w)
    return jac.reshape(-1, w.shape[0])


#: the objectives of the curvature tests, one object each (compiled programs are shared between the test files)
F_MLP = sq_objective(mlp_apply)
F_CE_MLP = ce_objective(mlp_apply)
F_CNN = ce_objective(cnn_apply)


def microbatch_problem(model: str):
    """``(f, params, batch)`` of the microbatched-equals-whole-batch curvature tests: a tanh MLP 5 -> 8 -> 8 -> 3 with
    squared loss (``"mlp"``) or the small CNN with cross-entropy (``"cnn"``), on 21 examples (an uneven last
    microbatch for any size that does not divide 21)."""
    if model == "mlp":
        return F_MLP, mlp_init(0, (5, 8, 8, 3)), regression_batch(1, 21, 5, 3)
    return F_CNN, cnn_init(0), image_batch(1, 21)


class NNXMLP(nnx.Module):
    """A tanh MLP ``d_in -> hidden -> d_out`` (default 4 -> 5 -> 3) as users write it in flax NNX."""

    def __init__(self, rngs, sizes=(4, 5, 3)):
        d_in, hidden, d_out = sizes
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def noise_stream(opt, params, num_steps):
    """xi_t and j_t for t = 1..num_steps from a ``noise_injection`` transformation itself (zero gradients)."""
    import optax

    from lsgeo.optim import perturbed_params

    @jax.jit
    def run(params):
        state = opt.init(params)

        def body(state, _):
            _, state = opt.update(optax.tree.zeros_like(params), state, perturbed_params(params, state))
            return state, (state.xi, state.group)

        return jax.lax.scan(body, state, None, length=num_steps)[1]

    return run(params)


#: the tiny regression problem of the multi-device training scripts (run by ``run_python``): X, Y, W0 and loss
DEVICE_TRAIN_PROBLEM = """
import sys, jax, numpy as np, optax
rng = np.random.default_rng(0)
X = rng.normal(size=(16, 3)).astype(np.float32); Y = rng.normal(size=(16, 1)).astype(np.float32)
W0 = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4, 1)).astype(np.float32)}
def loss(p, b):
    x, y = b
    return 0.5 * ((jax.numpy.tanh(x @ p["a"]) @ p["b"] - y) ** 2).mean()
"""


def group_leaf_params():
    """Three groups of two zero leaves each (6 x 5 and 10), float32: the parameters of the noise-stream tests."""
    return {f"layer{i}": {"a": np.zeros((6, 5), np.float32), "b": np.zeros(10, np.float32)} for i in range(3)}
