"""How many vectors go through one curvature product together (the one memory budget of
``lsgeo.curvature``), and the balanced ``lax.map`` that runs them.

Vmapping P probes (or Lanczos runs) through one Hessian-vector product shares the primal forward and
backward pass between them but multiplies the tangent activations by P: on a small model this is the
fast way to run many probes, on a large one it is what exhausts the device memory.
``auto_vectors_per_pass`` decides from a memory estimate: the bytes of every intermediate of one evaluation of the objective on
one microbatch (a ``jax.make_jaxpr`` trace, no compilation, cached per function and shapes), doubled
for the backward tangents, plus the per-vector state the caller declares (a Lanczos basis). As many
vectors as fit in ``PROBE_BUDGET_BYTES`` go together, at most ``MAX_CHUNK`` and at least one: a
ResNet-18 takes one probe at a time, a small MLP sixteen.
"""

from __future__ import annotations

from lsgeo.dataplan.budget import MEMORY_BUDGET_BYTES, activation_bytes, chunked_map  # noqa: F401 (re-exported)
from lsgeo.validation import check_positive_int

PROBE_BUDGET_BYTES = MEMORY_BUDGET_BYTES
MAX_CHUNK = 16


def check_vectors_per_pass(value, name: str = "vectors_per_pass") -> None:
    """``None`` (automatic) or a positive int."""
    if value is not None:
        check_positive_int(value, name)


def auto_vectors_per_pass(op, num_vectors: int, *, state_bytes_per_vector: int = 0) -> int:
    """Vectors per vmapped product of the curvature operator ``op`` (its ``activation_bytes`` on one
    microbatch, doubled for the tangents, plus the caller's per-vector state) within the budget."""
    per_vector = 2 * op.activation_bytes() + state_bytes_per_vector
    fits = PROBE_BUDGET_BYTES // max(per_vector, 1)
    return int(max(1, min(num_vectors, MAX_CHUNK, fits)))
