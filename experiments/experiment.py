"""What an experiment is: its parts (``Experiment``), its judgement (``Verdict``), its cells and their keys,
and the two errors a run can end with (``ConfigError``, ``Interrupted``).

An experiment is a grid of *cells* (one training run each, e.g. one (method, sigma, seed)). A complete
experiment module (``experiments/toy.py``)::

    '''Noise lowers the loss (module docstring: printed by --help).'''
    import dataclasses
    from experiments import cli, experiment, nets, plots, verdicts

    CLAIM = "Noise lowers the loss."              # the claim the run judges, one sentence

    @dataclasses.dataclass(frozen=True)
    class Config:
        '''What is run; the defaults finish on a 2-core CPU in minutes.'''
        sigmas: tuple[float, ...] = (0.0, 0.1)
        seeds: tuple[int, ...] = (0, 1, 2)       # every config has `seeds` (>= 3 for a verdict)
        steps: int = 200

    PRESETS = {"paper": Config(steps=10_000)}     # optional: named configs for --preset

    def validate(cfg):                            # optional: checks beyond the field conventions
        if cfg.steps < 100:                       # (experiments.config_checks), a ValueError naming the flag
            raise ValueError(f"--steps must be >= 100 for the loss to settle; got {cfg.steps}")

    def cells(cfg):                               # the grid, as dicts of JSON scalars
        return [dict(sigma=s, seed=k) for s in cfg.sigmas for k in cfg.seeds]

    def prepare(cfg):                             # optional: data shared by all cells
        return nets.load_dataset("digits")

    def run(cfg, data, cells):                    # one list of metric rows per cell
        return [[dict(step=cfg.steps, loss=...)] for c in cells]

    def summarize(cfg, rows):                     # rows: all cells' rows, cell fields included
        gain = verdicts.paired_gain(...)          # paired over seeds: null within noise
        return experiment.Verdict(gain.supported, {"gain": gain.mean}, table=[...],
                                  reason=gain.describe("loss gain"))

    def plot(cfg, rows):                          # optional: {file name: matplotlib figure}
        fig, ax = plots.plt.subplots(); ...
        return {"loss.png": fig}

    EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("sigma", "seed"))

    if __name__ == "__main__":
        cli.main(EXPERIMENT)

``batch_over`` names the cell fields that ``run`` may receive several values of in one call
(cells that agree on every other field are handed over together, so ``run`` can ``vmap`` over
them and compile once). From Python: ``runner.run_experiment(EXPERIMENT, Config(steps=5), out=tmp)``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

C = TypeVar("C")
Cell = dict[str, Any]
Row = dict[str, Any]


VERDICT_WORDS = {True: "supported", False: "contradicted", None: "null"}  # ``supported`` in the README's words


class Verdict(NamedTuple):
    """What ``summarize`` returns: the judgement of the claim from the run's own numbers."""

    supported: bool | None  # None: within noise, or the run cannot test the claim (``reason`` says which)
    figures: dict[str, float]  # flat: the numbers the claim is judged by
    table: list[Row]  # printed at the end of the run
    reason: str = ""  # why ``supported`` is what it is, in a sentence or two (printed and saved)
    # per claim part: its negative control's outcome (``verdicts.Part.record``): {part: {passed, control, ...}}
    controls: dict[str, dict] = {}
    # the verdict rule's minimum detectable effect next to the source's effect (``verdicts.Power.record``)
    power: dict[str, dict] = {}

    @property
    def word(self) -> str:
        """The verdict as the README table writes it (``VERDICT_WORDS``)."""
        return VERDICT_WORDS[self.supported]


def _module_name(module) -> str:
    spec = getattr(module, "__spec__", None)
    return spec.name.rsplit(".", 1)[-1] if spec is not None else Path(module.__file__).stem


@dataclasses.dataclass(frozen=True)
class Experiment(Generic[C]):
    """One experiment module's parts (see the module docstring for an example)."""

    name: str
    claim: str
    config: type
    cells: Callable[[C], list[Cell]]
    run: Callable[[C, Any, list[Cell]], list[list[Row]]]
    summarize: Callable[[C, list[Row]], Verdict]
    plot: Callable[[C, list[Row]], Mapping[str, Any]] | None = None
    presets: Mapping[str, C] = dataclasses.field(default_factory=dict)
    prepare: Callable[[C], Any] = lambda cfg: None
    batch_over: tuple[str, ...] = ()
    validate: Callable[[C], None] | None = None  # the experiment's own checks (raise ValueError naming the flag)

    @classmethod
    def from_module(cls, module_name: str, *, batch_over: tuple[str, ...] = ()) -> Experiment:
        """The experiment defined by the module ``module_name`` (pass ``__name__``): its ``CLAIM``,
        ``Config``, ``cells``, ``run``, ``summarize`` and, where defined, ``plot``, ``prepare``,
        ``validate`` and ``PRESETS``."""
        module = sys.modules[module_name]
        optional = {
            k: getattr(module, attr)
            for k, attr in (("plot", "plot"), ("prepare", "prepare"), ("presets", "PRESETS"), ("validate", "validate"))
            if hasattr(module, attr)
        }
        return cls(
            name=_module_name(module),
            claim=module.CLAIM,
            config=module.Config,
            cells=module.cells,
            run=module.run,
            summarize=module.summarize,
            batch_over=batch_over,
            **optional,
        )


def cell_key(cell: Cell) -> str:
    """File-name-safe, readable key of a cell: ``method=gd,sigma=0.1,seed=0``."""
    return ",".join(f"{k}={v}" for k, v in cell.items()).replace("/", "_").replace(" ", "")


class ConfigError(ValueError):
    """An invalid option or config value, found before a run folder is created. The message names
    the command-line flag (``--eval-every``); ``main`` prints it as one line and exits with status 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the finished cells are kept in ``run_dir``; the message says how to resume."""

    def __init__(self, message: str, run_dir: Path, kept: int, total: int):
        super().__init__(message)
        self.run_dir, self.kept, self.total = run_dir, kept, total


def flag(field: str) -> str:
    """The command-line flag of a config field: ``eval_every`` -> ``--eval-every``."""
    return "--" + field.replace("_", "-")
