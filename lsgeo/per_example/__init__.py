"""Per-example Jacobian Grams: the engine of the exact NTK and Gauss-Newton traces.

``grams`` holds the public functions and the generic path (per-example gradients by ``vmap`` of a
VJP); ``ghost`` holds the ghost-norm tracer behind ``method="fast"``, the one place in lsgeo that
reads jaxprs, with its fallback to the generic path. See :mod:`lsgeo.per_example.grams` for the
math and the cost.
"""

from lsgeo.per_example.ghost import FastPathFallbackWarning
from lsgeo.per_example.grams import (
    METHODS,
    fast_path_plan,
    gram_blocks,
    per_example_grams,
    sq_grad_norms,
)
from lsgeo.per_example.single import single_example, single_example_leaves

__all__ = ["METHODS", "FastPathFallbackWarning", "fast_path_plan", "gram_blocks", "per_example_grams", "sq_grad_norms", "single_example",
           "single_example_leaves"]
