"""pyproject.toml: an SPDX license with its file (no setuptools deprecation at install), floors that the
floors script can pin, and a warnings policy that fails on deprecations from lsgeo's own code."""

import os
import re
import tomllib
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def test_the_license_is_an_spdx_expression_with_its_file():
    """setuptools >= 77 deprecates a license table (main: ``license = { text = ... }``)."""
    project = PROJECT["project"]
    assert project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        assert os.path.isfile(os.path.join(ROOT, name)), name
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read()


def test_every_dependency_has_a_plain_floor_and_scipy_is_jax_s():
    """scripts/check_floors.sh pins every '>=X' to '==X'; jax 0.8.1 (the jax floor) requires scipy >= 1.13, so
    a lower scipy floor is unresolvable (main: scipy>=1.12, pip ResolutionImpossible)."""
    floors = {}
    for req in PROJECT["project"]["dependencies"] + PROJECT["project"]["optional-dependencies"]["test"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([A-Za-z0-9_.]+)\s*", req)
        assert match, req
        floors[match[1]] = tuple(int(p) for p in match[2].split(".")[:2])
    if floors["jax"] == (0, 8):
        assert floors["scipy"] >= (1, 13)


def test_a_deprecation_raised_from_lsgeo_is_an_error_and_a_third_party_one_is_not():
    """The pytest filters: DeprecationWarnings attributed to lsgeo's (or the experiments', or the tests') own
    calls fail the test; those raised inside other libraries are shown, not raised (main: all ignored)."""
    for module in ("lsgeo.curvature.krylov", "experiments.common", "test_packaging"):
        with pytest.raises(DeprecationWarning):
            warnings.warn_explicit("going away", DeprecationWarning, "x.py", 1, module=module)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("going away", DeprecationWarning, "x.py", 1, module="optax._src.base")
    assert len(seen) <= 1  # shown or recorded, never raised
