"""Experiments of lsgeo: one module per experiment, each run as ``python -m experiments.NAME``.

The shared machinery is ``experiments.runner`` (CLI, results folder, resume, summary) and
``experiments.common`` (data splits, the model contract, the training methods, paired verdicts).
"""
