"""The suite's guard against the kernel's memory-map limit (tests/conftest.py) rests on one fact about JAX:
``jax.clear_caches()`` unmaps the compiled programs nobody holds. Checked here, with a control."""

import gc

import jax
import jax.numpy as jnp
from conftest import mapped_regions


def _compile_distinct(count: int) -> list:
    functions = []
    for i in range(count):
        f = jax.jit(lambda x, i=i: jnp.sin(x) * i)
        f(jnp.ones((i + 1, 7))).block_until_ready()
        functions.append(f)
    return functions


def test_clear_caches_unmaps_compiled_programs():
    if not mapped_regions():
        return  # no /proc: the guard is a no-op there too
    _compile_distinct(20)  # first use maps some regions for good (allocator arenas, runtime)
    jax.clear_caches()
    gc.collect()
    before = mapped_regions()
    held = _compile_distinct(20)
    grown = mapped_regions() - before
    assert grown >= 20  # control: each compiled program maps regions of its own
    del held
    jax.clear_caches()
    gc.collect()
    assert mapped_regions() - before < grown / 4
