"""lsgeo.groups: the partition of a parameter tree into the M groups that layer-wise noise perturbs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo import groups

PARAMS = {
    "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.full(3, 2.0)},
    "Dense_1": {"kernel": jnp.ones((3, 1))},
}


@pytest.mark.parametrize(
    "spec, names",
    [
        (None, ["Dense_0", "Dense_1"]),
        ("leaf", ["Dense_0/bias", "Dense_0/kernel", "Dense_1/kernel"]),
        (lambda path: path[-1], ["bias", "kernel"]),
    ],
)
def test_group_names_and_ids_follow_the_spec(spec, names):
    ids, got = groups.group_ids(PARAMS, spec)
    assert got == names == groups.group_names(PARAMS, spec)
    # every leaf's id points at the name its path maps to
    for path, gid in zip(groups.leaf_paths(PARAMS), jax.tree.leaves(ids)):
        expected = {None: path[0], "leaf": "/".join(path)}.get(spec) if not callable(spec) else spec(path)
        assert got[gid] == expected


def test_flax_variables_are_looked_into():
    assert groups.group_names({"params": PARAMS}) == ["Dense_0", "Dense_1"]


def test_group_sq_norms_sum_to_the_tree_norm():
    norms = groups.group_sq_norms(PARAMS)
    assert set(norms) == {"Dense_0", "Dense_1"}
    np.testing.assert_allclose(float(norms["Dense_0"]), 6 + 3 * 4)
    total = sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(PARAMS))
    np.testing.assert_allclose(sum(float(v) for v in norms.values()), total)


@pytest.mark.parametrize("bad", ["layer", 3])
def test_bad_group_spec_is_an_error(bad):
    with pytest.raises(ValueError, match="groups must be"):
        groups.group_ids(PARAMS, bad)


@pytest.mark.parametrize("index, ok", [(0, True), (1, True), (-2, True), (2, False), (-3, False), (1.0, False), (True, False)])
def test_check_group_index_range(index, ok):
    if ok:
        groups.check_group_index(index, 2)
    else:
        with pytest.raises(ValueError, match="group"):
            groups.check_group_index(index, 2)
