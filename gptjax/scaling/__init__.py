"""Scaling-law sweeps: define, run (here or on SLURM), tabulate, fit and plot.

One module per concept: :mod:`~gptjax.scaling.sweep` (the definition, its runs and their
directory), :mod:`~gptjax.scaling.claims` (who trains a run), :mod:`~gptjax.scaling.task`
(train one run), :mod:`~gptjax.scaling.local` and :mod:`~gptjax.scaling.slurm` (executors),
:mod:`~gptjax.scaling.results` (states, ``results.csv``, the status table),
:mod:`~gptjax.scaling.fits` and :mod:`~gptjax.scaling.plots`. The names below are the API.
"""

from gptjax.scaling.fits import (
    Fit,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    fit_sweep,
    frontier,
    isoflop,
)
from gptjax.scaling.local import SweepResult, run_sweep, run_workers
from gptjax.scaling.plots import plot_run, plot_sweep
from gptjax.scaling.results import COLUMNS, format_status, states, table
from gptjax.scaling.slurm import SlurmOptions, submit, submit_sweep
from gptjax.scaling.sweep import Run, Sweep, config_hash, expand, load_sweep

__all__ = [
    "COLUMNS", "Fit", "Run", "SlurmOptions", "Sweep", "SweepResult", "compute_optimal", "config_hash",
    "expand", "fit_chinchilla", "fit_power_law", "fit_sweep", "format_status", "frontier", "isoflop",
    "load_sweep", "plot_run", "plot_sweep", "run_sweep", "run_workers", "states", "submit", "submit_sweep",
    "table",
]  # fmt: skip
