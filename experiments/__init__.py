"""Experiments of lsgeo: one module per experiment, each run as ``python -m experiments.NAME``.

The shared machinery, one concept per module (``SHARED``), layered bottom-up:

- ``experiment``: what an experiment module defines (``Experiment``, ``Verdict``), cells and their keys;
- ``context``: what a run in progress tells the code it calls (data options, progress bars);
- ``config_checks``: the checks of a config before a run (``check_config``);
- ``rundir``: run folders, the code version, resume;
- ``runner``: config -> cells -> rows -> summary (``run_experiment``); ``cli``: the command line (``main``);
- ``verdicts``: paired tests over seeds and Holm's correction; ``discrimination``: each claim part beside its
  negative control (``judge``) and the minimum detectable effect next to the source's (``Power``);
- ``records``: reading the rows of a run; ``plots``: figures;
- ``nets``: data splits, objectives, classifiers; ``training``: the training methods (GD, GD+noise) as cells.
"""

SHARED = frozenset(
    {"experiment", "context", "config_checks", "rundir", "runner", "cli", "verdicts", "records", "plots", "nets",
     "training", "discrimination", "taylor_order"}
)  # fmt: skip
