"""Mutation testing of lsgeo's core numerical modules: plant small bugs, check that the matching tests fail.

Not part of CI (a run takes tens of minutes). Each mutant is one syntactic change of one module, made on
the abstract syntax tree (so the file stays valid Python):

  arithmetic   + <-> -,  * <-> /,  ** -> *,  // -> /
  comparison   < <-> <=,  > <-> >=,  == <-> !=
  boolean      and <-> or,  not x -> x,  -x -> x
  constant     0 <-> 1,  other numbers n -> n + 1 (ints) or 1.5 n (floats)
  call         jnp.maximum <-> jnp.minimum,  jnp.sum <-> jnp.mean,  jnp.abs(x) -> x,  jnp.sqrt(x) -> x

Argument checks (``raise`` statements and the ``if`` tests guarding them, ``check_*`` calls, f-strings),
docstrings, decorators, default argument values, annotations and memory budgets (``*BUDGET*``,
``MAX_CHUNK``: they change how many vectors share a product, not a value) are not mutated: a wrong error
message is not a numerical bug. A mutant is *killed* when the tests fail (or error), *survived* when they pass and
*timed out* when they run longer than ``--timeout-factor`` times the unmutated run. JAX compilations
are kept in a persistent cache shared by the mutants (it is keyed by the compiled program, so a mutant
never reuses a program it changed).

Every module is run against its own test files only (``MODULES`` below). Mutants are sampled per module
with a fixed seed (``--per-module``; ``--all`` for every candidate), so a run is reproducible:

    python scripts/mutation.py --list                        # the candidates per module
    python scripts/mutation.py --per-module 12 --jobs 2      # ~100 mutants, ~45 min on 2 CPU cores
    python scripts/mutation.py --modules lsgeo/risk.py --all --json results/mutation.json

It works on a copy of the repository (``--work``, default a temporary folder): the checkout is never
modified. Exit status 0 when no mutant survived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> the test files that are meant to catch its bugs (fast ones; the reference tests of issue 22 first).
# Every module of lsgeo/curvature/ (found when the script runs) gets CURVATURE; files that do not exist are dropped.
CURVATURE = ["tests/test_curvature_references.py", "tests/test_curvature_krylov.py", "tests/test_curvature_trace.py",
             "tests/test_curvature_products.py", "tests/test_curvature_operators.py"]
MODULES = {
    "lsgeo/dataplan/summation.py": ["tests/test_dataplan.py", "tests/test_curvature_trace.py", "tests/test_launch.py"],
    "lsgeo/dataplan/memory.py": ["tests/test_dataplan.py", "tests/test_curvature_trace.py"],
    "lsgeo/objective.py": ["tests/test_objective.py", "tests/test_dataplan.py"],
    "lsgeo/risk.py": ["tests/test_risk_references.py", "tests/test_risk.py"],
    "lsgeo/optim.py": ["tests/test_optim_references.py", "tests/test_optim.py"],
    "lsgeo/perturbation.py": ["tests/test_perturbation.py", "tests/test_optim_references.py",
                              "tests/test_risk_references.py"],
    "lsgeo/ntk.py": ["tests/test_ntk_references.py", "tests/test_ntk.py"],
    "lsgeo/sharpness.py": ["tests/test_sharpness_references.py", "tests/test_sharpness.py"],
}

_BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
           ast.FloorDiv: ast.Div}
_CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq}
_CALL_SWAPS = {"maximum": "minimum", "minimum": "maximum", "sum": "mean", "mean": "sum"}
_CALL_DROPS = {"abs", "sqrt"}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.FloorDiv: "//",
           ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
           ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    module: str
    index: int  # position among the module's candidates (deterministic AST order)
    line: int
    description: str
    outcome: str = ""
    seconds: float = 0.0
    source_line: str = ""
    failed_test: str = ""


def _is_jnp_attr(func) -> str | None:
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("jnp", "np"):
        return func.attr
    return None


def _skipped_subtrees(tree):
    """ids of nodes that are never mutated (argument checks, messages, docstrings, decorators, defaults)."""
    skip = set()

    def mark(node):
        for sub in ast.walk(node):
            skip.add(id(sub))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                mark(dec)
            mark(node.args)
            if node.returns is not None:
                mark(node.returns)
            if node.name.startswith(("check_", "_check")):
                mark(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                mark(first)
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert, ast.AnnAssign)):
            mark(node)
        if isinstance(node, ast.If) and any(isinstance(s, ast.Raise) for s in node.body):
            mark(node.test)
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name.startswith(("check_", "_check")) or name in ("warn", "warn_fallback"):
                mark(node)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and (t.id == "__all__" or "BUDGET" in t.id or t.id == "MAX_CHUNK")
            for t in node.targets
        ):  # names, and memory budgets that only decide how many vectors share a product
            mark(node)
    return skip


def _candidates(tree):
    """(node, kind, description) for every mutable spot, in ast.walk order."""
    skip = _skipped_subtrees(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            new = _BINOPS[type(node.op)]
            out.append((node, "binop", f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}"))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            new = _CMPOPS[type(node.ops[0])]
            out.append((node, "compare", f"{_SYMBOL[type(node.ops[0])]} -> {_SYMBOL[new]}"))
        elif isinstance(node, ast.BoolOp):
            other = "or" if isinstance(node.op, ast.And) else "and"
            out.append((node, "boolop", f"{_SYMBOL[type(node.op)]} -> {other}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append((node, "unary", "drop " + ("not" if isinstance(node.op, ast.Not) else "unary -")))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            v = node.value
            new = 1 if v == 0 else 0 if v == 1 else (v + 1 if isinstance(v, int) else 1.5 * v)
            out.append((node, "constant", f"{v!r} -> {new!r}"))
        elif isinstance(node, ast.Call):
            name = _is_jnp_attr(node.func)
            if name in _CALL_SWAPS:
                out.append((node, "call", f"{name} -> {_CALL_SWAPS[name]}"))
            elif name in _CALL_DROPS and len(node.args) == 1 and not node.keywords:
                out.append((node, "call", f"{name}(x) -> x"))
    return out


class _Apply(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit(self, node):
        if node is not self.target:
            return self.generic_visit(node)
        if isinstance(node, ast.BinOp):
            node.op = _BINOPS[type(node.op)]()
        elif isinstance(node, ast.Compare):
            node.ops = [_CMPOPS[type(node.ops[0])]()]
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.Constant):
            v = node.value
            node.value = 1 if v == 0 else 0 if v == 1 else (v + 1 if isinstance(v, int) else 1.5 * v)
        elif isinstance(node, ast.Call):
            name = _is_jnp_attr(node.func)
            if name in _CALL_SWAPS:
                node.func.attr = _CALL_SWAPS[name]
            else:
                return node.args[0]
        return node


def candidates(source: str):
    return _candidates(ast.parse(source))


def mutate(source: str, index: int) -> str:
    tree = ast.parse(source)
    node, _, _ = _candidates(tree)[index]
    tree = _Apply(node).visit(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"


def _pytest(workdir: Path, tests, timeout, env, *, deselect=(), first_failure=True):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "not slow",
           *(["-x"] if first_failure else []), *[a for d in deselect for a in ("--deselect", d)], *tests]
    # subprocesses that tests start (forced device counts) must import this copy, not an installed lsgeo
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH", "")])))
    start = time.monotonic()
    try:
        out = subprocess.run(cmd, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out", time.monotonic() - start, ""
    failed = [ln.split(" ")[1] for ln in out.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if not first_failure:
        return ("survived" if out.returncode == 0 else "killed"), time.monotonic() - start, failed
    return ("survived" if out.returncode == 0 else "killed"), time.monotonic() - start, " ".join(failed[:1])


def _copy_tree(source: Path, dest: Path):
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "results", "*.egg-info",
                                                                 ".pytest_cache", "mutants"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="repository to mutate (copied, never modified)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the working copies (default: a temp dir)")
    parser.add_argument("--modules", nargs="*", default=None, help="modules to mutate (default: every one of MODULES)")
    parser.add_argument("--per-module", type=int, default=12, help="mutants sampled per module")
    parser.add_argument("--all", action="store_true", help="every candidate of every module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at the same time (one copy each)")
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument("--list", action="store_true", help="print the candidates and exit")
    parser.add_argument("--json", type=Path, default=None, help="write every mutant's outcome here")
    parser.add_argument("--deselect-failing", action="store_true",
                        help="deselect tests that already fail unmutated (else: stop)")
    args = parser.parse_args(argv)
    for path in sorted((args.source / "lsgeo" / "curvature").rglob("*.py")):
        if path.name != "__init__.py":
            MODULES.setdefault(f"lsgeo/curvature/{path.name}", CURVATURE)
    for module, tests in MODULES.items():
        MODULES[module] = [t for t in tests if (args.source / t).exists()]
    if args.modules is None:
        args.modules = sorted(MODULES)

    sources = {m: (args.source / m).read_text() for m in args.modules}
    plan = []
    for module in args.modules:
        cands = candidates(sources[module])
        lines = sources[module].splitlines()
        chosen = range(len(cands)) if args.all else sorted(
            random.Random(f"{args.seed}:{module}").sample(range(len(cands)), min(args.per_module, len(cands))))
        if args.list:
            print(f"{module}: {len(cands)} candidates")
        for i in chosen:
            node, _, desc = cands[i]
            plan.append(Mutant(module, i, node.lineno, desc, source_line=lines[node.lineno - 1].strip()))
            if args.list:
                print(f"  #{i:4d} line {node.lineno:4d}  {desc:24s} {lines[node.lineno - 1].strip()[:80]}")
    if args.list:
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="lsgeo-mutation-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONDONTWRITEBYTECODE="1")
    copies = []
    for j in range(max(1, args.jobs)):
        dest = work / f"copy{j}"
        if dest.exists():
            shutil.rmtree(dest)
        _copy_tree(args.source, dest)
        copies.append(dest)

    # the unmutated runs: their time sets the timeout; tests that fail unmutated are deselected (reported)
    baseline, deselected = {}, {}
    for tests in sorted({tuple(MODULES[m]) for m in args.modules}):
        outcome, seconds, failed = _pytest(copies[0], tests, None, env, first_failure=False)
        if outcome != "survived":
            if not failed or not args.deselect_failing:
                print(f"the unmutated tests fail ({' '.join(failed)}): {' '.join(tests)}", file=sys.stderr)
                return 2
            print(f"deselected, failing unmutated: {' '.join(failed)}", flush=True)
        baseline[tests], deselected[tests] = seconds, tuple(failed)
        print(f"baseline {seconds:6.1f} s  {' '.join(tests)}", flush=True)

    free = list(copies)

    def run(mutant: Mutant):
        dest = free.pop()
        try:
            path = dest / mutant.module
            path.write_text(mutate(sources[mutant.module], mutant.index))
            tests = tuple(MODULES[mutant.module])
            timeout = max(60.0, args.timeout_factor * baseline[tests])
            mutant.outcome, mutant.seconds, mutant.failed_test = _pytest(dest, tests, timeout, env,
                                                                         deselect=deselected[tests])
            path.write_text(sources[mutant.module])
        finally:
            free.append(dest)
        print(f"{mutant.outcome:9s} {mutant.seconds:6.1f} s  {mutant.module}:{mutant.line}  {mutant.description:22s} "
              f"{mutant.source_line[:70]}", flush=True)
        return mutant

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(copies)) as pool:
        results = list(pool.map(run, plan))
    counts = {k: sum(r.outcome == k for r in results) for k in ("killed", "survived", "timed out")}
    print(f"\n{len(results)} mutants in {time.monotonic() - start:.0f} s: " +
          ", ".join(f"{v} {k}" for k, v in counts.items()))
    for r in results:
        if r.outcome != "killed":
            print(f"  {r.outcome}: {r.module}:{r.line} (#{r.index}) {r.description}: {r.source_line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"counts": counts, "seed": args.seed, "per_module": args.per_module,
                                         "deselected": sorted({d for v in deselected.values() for d in v}),
                                         "mutants": [asdict(r) for r in results]}, indent=1))
    return 0 if counts["survived"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
