"""The import layering of docs/architecture.md, read from the source (ast, nothing imported):
no import cycle between lsgeo modules; the data plan imports no curvature (nor the objective); the operators
import no estimator; lsgeo.train imports no curvature internals (only the public ``lsgeo.curvature``)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ESTIMATORS = ("krylov", "eigen", "trace_estimators", "diagonal", "density", "solve", "chunking", "track", "dense", "products")


def _modules():
    mods = {}
    for path in (ROOT / "lsgeo").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name, path, mods):
    """The lsgeo modules ``name`` imports (at any depth of its code, lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return {m for m in found if m in mods and m != name}


GRAPH = {name: _imports(name, path, mods) for mods in [_modules()] for name, path in mods.items()}


def test_no_import_cycle():
    # packages import their submodules (re-exports); a cycle is a path back to a module through non-parent edges
    def edges(m):
        return {d for d in GRAPH[m] if not m.startswith(d + ".")}

    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in edges(m):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def _violations(prefix, forbidden):
    return sorted((m, d) for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")
                  for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))


def test_dataplan_imports_no_curvature_and_no_objective():
    assert _violations("lsgeo.dataplan", ["lsgeo.curvature", "lsgeo.objective", "lsgeo.risk", "lsgeo.train"]) == []


def test_objective_imports_no_operator():
    assert _violations("lsgeo.objective", ["lsgeo.curvature", "lsgeo.risk", "lsgeo.train"]) == []


def test_operators_import_no_estimator():
    assert _violations("lsgeo.curvature.operators", [f"lsgeo.curvature.{e}" for e in ESTIMATORS]) == []


def test_train_imports_no_curvature_internals():
    internals = [m for m in GRAPH if m.startswith("lsgeo.curvature.")]
    assert _violations("lsgeo.train", internals) == []
