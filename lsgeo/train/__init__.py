"""Training on ``lax.scan``: GD / minibatch SGD, noise injection, SAM, SWA, augmentation, vmapped sweeps.

One concept per module:

- :mod:`~lsgeo.train.state`     ``TrainState`` (the point the loop holds, optimizer and model state, step,
                                 data key, SWA mean, divergence) and ``init_state``;
- :mod:`~lsgeo.train.step`      ``train_step``, the pure step a user compiles in their own loop;
- :mod:`~lsgeo.train.batches`   which examples step t sees (per-epoch shuffling, resumable);
- :mod:`~lsgeo.train.swa`       the SWA running mean;
- :mod:`~lsgeo.train.evaluate`  the metrics at the clean iterate;
- :mod:`~lsgeo.train.chunk`     the compiled unit (``eval_every`` steps + an evaluation);
- :mod:`~lsgeo.train.run`       what ``train`` and ``sweep`` share: ``RunOptions`` (their common keywords,
                                 described once), their checks and data, the measurement's checks;
- :mod:`~lsgeo.train.loop`      ``train`` (one run, resumable, ``TrainingDiverged``);
- :mod:`~lsgeo.train.sweep`     ``sweep`` (vmapped over hyperparameters and seeds);
- :mod:`~lsgeo.train.devices`   data parallelism over ``jax.devices()``.

Measurements inside the loop (``measure=``) are any ``(init, update)`` pair; the curvature trackers live with
the curvature code, :mod:`lsgeo.curvature.track` (``top_eigenvalue_tracker``, ``trace_tracker``), and are
re-exported here (``lsgeo.train.top_eigenvalue_tracker``, ``lsgeo.train.measure``: that module).

Objectives follow the lsgeo contract: ``objective(params, batch) -> scalar``, or with a model state
(BatchNorm) ``objective(params, model_state, batch) -> (loss, new_model_state)``. Data travels as an
argument of the compiled functions, never as a closure constant.
"""

from lsgeo import curvature as _curvature
from lsgeo.train.batches import augment_key, epoch_permutation, minibatch
from lsgeo.train.evaluate import evaluate
from lsgeo.train.loop import TrainingDiverged, TrainResult, train
from lsgeo.train.run import RunOptions
from lsgeo.train.state import Divergence, SWAState, TrainState, init_state, split_key
from lsgeo.train.step import train_step
from lsgeo.train.swa import swa_update
from lsgeo.train.sweep import SweepResult, sweep

measure = _curvature.track
Measurement = _curvature.track.Measurement
top_eigenvalue_tracker = _curvature.track.top_eigenvalue_tracker
trace_tracker = _curvature.track.trace_tracker

__all__ = [
    "TrainState",
    "SWAState",
    "Divergence",
    "init_state",
    "split_key",
    "train_step",
    "epoch_permutation",
    "minibatch",
    "augment_key",
    "swa_update",
    "evaluate",
    "train",
    "TrainResult",
    "TrainingDiverged",
    "sweep",
    "SweepResult",
    "RunOptions",
    "measure",
    "Measurement",
    "top_eigenvalue_tracker",
    "trace_tracker",
]
