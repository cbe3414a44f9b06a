"""Executes every notebook in notebooks/ top to bottom, so that a broken notebook fails the suite.

Each notebook runs in its own Jupyter kernel (the interpreter running pytest, ``sys.executable``, through a
throw-away kernel spec: no installed kernel is needed or used), in a temporary working directory, with

- ``LSGEO_NOTEBOOK_SMOKE=1``: the knob cell of every notebook shrinks its sizes;
- ``PYTHONPATH`` starting with the repository root, so ``import lsgeo`` works without ``pip install -e``;
- ``XLA_FLAGS=--xla_backend_optimization_level=0 ...``: at smoke sizes compiling dominates the run time and
  unoptimised XLA code compiles about 3x faster.

The notebooks are independent processes, so they run concurrently (one asyncio loop, one kernel each).
A cell that raises, or runs longer than ``CELL_TIMEOUT`` seconds, fails the notebook's test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (a dependency of nbclient)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell (smoke cells take a few seconds; generous for loaded machines)
KERNEL_NAME = "lsgeo-notebook-test"
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _kernel_spec_manager(folder: Path) -> KernelSpecManager:
    """A kernel spec that launches ipykernel with this interpreter, visible only to this test."""
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lsgeo notebook test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder / "kernels")])


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LSGEO_NOTEBOOK_SMOKE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
    env.setdefault("MPLBACKEND", "Agg")
    return env


async def _execute(path: Path, workdir: Path, ksm: KernelSpecManager) -> None:
    nb = nbformat.read(path, as_version=4)
    # first cell: check that the kernel runs the interpreter under test
    check = f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    workdir.mkdir()
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    client = nbclient.NotebookClient(
        nb, km=km, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT, allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    await client.async_execute(env=_kernel_env())


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory) -> dict[str, BaseException | None]:
    """Runs the notebooks selected in this session concurrently; {name: exception or None}."""
    selected = {item.callspec.params["path"].name for item in request.session.items
                if getattr(item, "originalname", None) == "test_notebook_runs" and hasattr(item, "callspec")}
    paths = [p for p in NOTEBOOKS if p.name in selected]
    base = tmp_path_factory.mktemp("notebooks")
    ksm = _kernel_spec_manager(base)

    async def run_all():
        return await asyncio.gather(*(_execute(p, base / p.stem, ksm) for p in paths), return_exceptions=True)

    return dict(zip([p.name for p in paths], asyncio.run(run_all())))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_primitives.ipynb", "02_noise_injection.ipynb", "03_landscape.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_clean(path):
    """Committed without outputs; the knob cell reads LSGEO_NOTEBOOK_SMOKE."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs"
    assert any('os.environ.get("LSGEO_NOTEBOOK_SMOKE")' in c.source for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, executed):
    error = executed[path.name]
    if error is not None:
        raise error
