"""Keep the console for what the user asked for: library log lines are hidden unless --debug.

orbax logs through absl (``WARNING:absl:Given directory is read only=...`` on every
load, which reads like a fault), TensorFlow (imported by TFDS) announces its oneDNN
options, and XLA's C++ runtime (Gloo collectives included) logs at INFO. None of it is
actionable for a user of the CLI; ``gptjax --debug`` shows all of it. Errors still print.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from gptjax.errors import GptjaxWarning

_quiet = False


def is_quiet() -> bool:
    """Whether :func:`quiet_libraries` ran (the CLI without ``--debug``)."""
    return _quiet


def quiet_libraries() -> None:
    """Hide INFO/WARNING lines of absl, TensorFlow and the XLA/TSL C++ runtime (idempotent).

    Call before JAX or TensorFlow is imported: their C++ loggers read the environment once.
    """
    global _quiet
    _quiet = True
    # C++ INFO and WARNING of TensorFlow, XLA and TSL (oneDNN, Gloo, "Logging before InitGoogle").
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("WANDB_SILENT", "true")  # gptjax prints the run's URL (or directory) itself
    for name in ("tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # orbax logs through absl, errors included: its logged tracebacks would bury the one-line error.
    logging.getLogger("absl").setLevel(logging.CRITICAL)


# Where launchers put a process's index: gptjax launch / by hand, srun, mpirun.
_RANK_VARIABLES = ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def show_warnings_as_lines() -> None:
    """Print :class:`GptjaxWarning` as one ``gptjax: warning: ...`` line on stderr, on the
    first process of a multi-process run only (the warnings are about the config, which
    every process reads alike)."""
    default = warnings.showwarning
    rank = next((os.environ[k] for k in _RANK_VARIABLES if os.environ.get(k)), "0")

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GptjaxWarning):
            if rank != "0":
                return
            print(f"gptjax: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
