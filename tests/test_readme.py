"""The README's tour runs as written (its python blocks, in order, in one namespace)."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its tour"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "top-5 eigs" in printed and "NTK trace" in printed
    history = namespace["result"].history["train_loss"]
    assert jnp.all(jnp.isfinite(history)) and history[-1] < history[0]
