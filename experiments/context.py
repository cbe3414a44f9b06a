"""What a run in progress tells the code it calls: where data come from (``--data-dir``, ``--download``)
and whether to show progress bars. Set by ``runner.run_experiment`` for the duration of a run."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm


class DataOptions(NamedTuple):
    """Where the data of a run come from (``--data-dir``, ``--download``); see ``nets.load_dataset``."""

    data_dir: Path | None = None
    download: bool = False


_DATA = contextvars.ContextVar("experiments_data_options", default=DataOptions())
_PROGRESS = contextvars.ContextVar("experiments_progress", default=False)


@contextlib.contextmanager
def running(data: DataOptions = DataOptions(), progress: bool = False):
    """The context of a run: ``data_options()`` returns ``data`` and ``progress_bar`` shows bars if ``progress``."""
    tokens = (_DATA.set(data), _PROGRESS.set(progress))
    try:
        yield
    finally:
        _DATA.reset(tokens[0])
        _PROGRESS.reset(tokens[1])


def data_options() -> DataOptions:
    """The data options of the run in progress (defaults outside a run)."""
    return _DATA.get()


@contextlib.contextmanager
def progress_bar(total: int, desc: str):
    """A tqdm bar over ``total`` training steps, yielding the ``callback(step, metrics)`` that
    ``lsgeo.train.train`` / ``sweep`` call after each chunk (None when the run shows no progress)."""
    if not _PROGRESS.get():
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, position=1, file=sys.stderr)

    def callback(step, metrics):
        bar.update(int(step) - bar.n)

    try:
        yield callback
    finally:
        bar.close()
