"""Preemption: SIGTERM or SIGINT ends a run at the next step boundary, after a checkpoint.

The handler is installed when ``train`` starts and removed when it returns, so a signal
during start-up or compilation stops the run after its first step, and one during the
final evaluation, save or samples lets the save finish and skips the samples. A second
SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import signal
import threading

import jax


class StopRequest:
    """Turns SIGTERM/SIGINT into "finish this step, save, exit 0".

    With several processes, signals are left to JAX's preemption service (SIGTERM) and
    every process asks :meth:`at` whether to stop, so all of them save the same step.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._multi = jax.process_count() > 1
        self._depth = 0

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in () if self._multi else (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def at(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
