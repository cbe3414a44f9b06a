"""Experiments of lsgeo: one module per experiment, each run as ``python -m experiments.NAME``.

The shared machinery (CLI, results folder, resume, summary) is ``experiments._runner``.
"""
