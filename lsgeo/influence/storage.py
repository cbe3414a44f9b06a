"""Scores on disk: a numpy ``.npy`` memmap written block by block, resumable after an interruption.

``out=path`` writes the scores array to ``path`` (``numpy.lib.format.open_memmap``) and, next to it,
``path + ".done.npy"``: one flag per block, set (and flushed) after the block's rows are flushed. A run that
finds both files, with the same shape and dtype, computes only the blocks whose flag is unset; a finished
file is returned as it is. The flags file is kept (its presence with all flags set marks a complete run).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["ScoreFile", "open_scores"]


class ScoreFile:
    """The memmap of scores and its per-block completion flags (``open_scores``)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype, num_blocks: int):
        self.path, self.flags_path = os.fspath(path), os.fspath(path) + ".done.npy"
        resume = os.path.exists(self.path) and os.path.exists(self.flags_path)
        if resume:
            self.array = np.load(self.path, mmap_mode="r+")
            self.done = np.load(self.flags_path, mmap_mode="r+")
            same = self.array.shape == tuple(shape) and self.array.dtype == np.dtype(dtype)
            if not same or self.done.shape != (num_blocks,):
                raise ValueError(
                    f"out={self.path!r} holds scores of shape {self.array.shape} ({self.array.dtype}) in "
                    f"{self.done.shape[0]} blocks, this run writes {tuple(shape)} ({np.dtype(dtype)}) in {num_blocks}: "
                    f"remove the file (and {self.flags_path!r}) or write elsewhere")
        else:
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=tuple(shape))
            self.done = np.lib.format.open_memmap(self.flags_path, mode="w+", dtype=bool, shape=(num_blocks,))

    def write(self, block: int, start: int, values: np.ndarray) -> None:
        self.array[start:start + values.shape[0]] = values
        self.array.flush()
        self.done[block] = True
        self.done.flush()


def open_scores(path, shape, dtype, num_blocks) -> ScoreFile:
    """The :class:`ScoreFile` at ``path`` (created, or reopened to resume)."""
    return ScoreFile(path, shape, dtype, num_blocks)
