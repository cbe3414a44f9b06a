"""Shared test set-up.

The suite is dominated by XLA compile time on tiny models, so it compiles at backend optimisation
level 0 (set before jax initialises its backend; subprocesses and notebook kernels inherit it).
Tests that compare to 1e-10 use the ``x64`` fixture (float64 inside the test only).
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
