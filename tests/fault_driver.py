"""Run a gptjax command and signal it at one phase of training (for the fault tests).

``python tests/fault_driver.py PHASE SIGNAL gptjax-args...`` sends SIGNAL (SIGTERM or
SIGKILL) to its own process when training reaches PHASE:

* ``compile``: as the train step starts compiling;
* ``loop``: after step 3's progress line;
* ``eval``: as the first evaluation inside the loop starts;
* ``save``: while the first checkpoint of the loop is being written (asynchronously);
* ``final_eval``: as the evaluation after the last step starts;
* ``final_save``: while the final checkpoint is being written;
* ``samples``: as the end-of-run samples start;
* ``none``: never.

Only wrappers around library functions: the command runs as ``gptjax`` runs it.
"""

import importlib
import os
import signal
import sys

import jax

from gptjax import checkpoint, cli, metrics

train_lib = importlib.import_module("gptjax.train")
sample_lib = importlib.import_module("gptjax.sample")


def main() -> int:
    phase, signame, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    sig = getattr(signal, signame)
    fired = []

    def fire():
        if not fired:
            fired.append(phase)
            print(f"fault_driver: {signame} at {phase}", flush=True)
            os.kill(os.getpid(), sig)

    def wrap(owner, name, before=None, after=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if before and before(*args, **kwargs):
                fire()
            result = original(*args, **kwargs)
            if after and after(*args, **kwargs):
                fire()
            return result

        setattr(owner, name, wrapper)

    steps = {}
    wrap(train_lib, "_run", before=lambda config, *a: steps.setdefault("total", config.train.steps) and False)
    if phase == "compile":
        wrap(jax.stages.Lowered, "compile", before=lambda *a, **k: True)
    elif phase == "loop":
        wrap(metrics.MetricsLogger, "progress", after=lambda self, step, row: step == 3 and "loss" in row)
    elif phase in ("eval", "final_eval"):
        # evaluate(setup, params, val, config, ...): the final one runs once the loop is over.
        def at_eval(setup, params, val, config, *rest, **kwargs):
            steps["evals"] = steps.get("evals", 0) + 1
            return phase == "eval" or steps.get("loop_done")

        wrap(train_lib, "evaluate", before=at_eval)
        wrap(metrics, "peak_memory", after=lambda *a: steps.setdefault("loop_done", True) and False)
    elif phase == "save":
        wrap(checkpoint.Checkpointer, "save", after=lambda self, step, *a, **k: step < steps["total"])
    elif phase == "final_save":
        wrap(checkpoint.Checkpointer, "save", after=lambda self, step, *a, **k: step == steps["total"])
    elif phase == "samples":
        wrap(sample_lib, "generate", before=lambda *a, **k: True)
    elif phase == "none":  # no signal: a plain run
        pass
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    train_lib.peak_memory = metrics.peak_memory  # train imported the name before the wrap
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
