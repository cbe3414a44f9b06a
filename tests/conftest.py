"""Shared fixtures. Tests that compare to 1e-10 use the ``x64`` fixture (float64 inside the test only)."""

import jax
import pytest


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
