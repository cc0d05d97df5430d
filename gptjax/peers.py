"""A lost peer of a multi-process run is one line and exit code 3, within seconds.

When another process of a ``jax.distributed`` run dies or hangs, JAX's C++ runtime ends
the survivors with a fatal log and a stack dump (20-50 lines, exit 134), and only after
its heartbeat timeout (100 s by default) when the lost process was not the coordinator.
Two things here make that one line (:data:`MESSAGE`) and :data:`EXIT_PEER_LOST`:

* :func:`filter_native_output` passes this process's file descriptor 2 through a thread
  that, on the first line in which the coordination service reports a failure, prints the
  message and ends the process before the C++ runtime has written its stack dump (the
  runtime offers no Python callback: its ``missed_heartbeat_callback`` cannot be given the
  status it is called with);
* the CLI asks :func:`caused_by_lost_peer` about an exception it did not expect: a
  collective whose peer's connection broke (gloo's "Connection reset by peer") is the
  same one line;
* :func:`heartbeat_timeout` lowers JAX's heartbeat timeout, the time in which the
  coordinator notices a worker that died or stopped (SIGKILL, SIGSTOP, a lost host), to
  30 s: short enough to free a hung job's hosts soon, long enough that a healthy run on a
  busy or briefly paused host is not ended; ``GPTJAX_HEARTBEAT_TIMEOUT`` (seconds) sets it.
  When the coordinator reports a process's heartbeats stopped, the line says so and names
  the setting.

The filter is installed only for multi-process runs and only without ``--debug``; it also
drops Gloo's "connected to N peer ranks" lines from descriptor 1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading

from gptjax.errors import EXIT_PEER_LOST, GptjaxError

HEARTBEAT_TIMEOUT_SECONDS = 30
MESSAGE = (
    "gptjax: error: another process of this multi-process run died or stopped responding, so this "
    "one stopped too; the checkpoints saved so far are intact: restart every process to resume"
)

# A C++ log line ("E1203 05:42:03.139093    1167 file.cc:289] ...") from the parts of the
# runtime that report a task as dead, unreachable or unhealthy.
_PEER_FAILURE = re.compile(
    r"^[EF]\d{4} [\d:.]+\s+\d+ (coordination_service\w*|client|preemption_sync_manager)\.(cc|h):\d+\]"
)

# What the coordinator's failure line says when a process's heartbeats stopped.
_NO_HEARTBEAT = "stopped sending heartbeats"

# Gloo's line on connecting (C++, on stdout), the only thing it prints in a healthy run.
_GLOO_CONNECTED = re.compile(rb"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks")

# What a collective raises when its peer's connection broke (gloo on CPU).
_LOST_CONNECTION = re.compile(r"Gloo .* failed|Connection (reset|closed) by peer|Broken pipe")

_real_stderr: int | None = None  # the terminal's (or file's) descriptor while filtering


def heartbeat_timeout(env) -> int:
    """Seconds without a heartbeat after which a peer counts as lost (env override)."""
    value = env.get("GPTJAX_HEARTBEAT_TIMEOUT", "").strip()
    if not value:
        return HEARTBEAT_TIMEOUT_SECONDS
    if not value.isdigit() or int(value) < 1:
        raise GptjaxError(f"GPTJAX_HEARTBEAT_TIMEOUT={value!r} must be a whole number of seconds >= 1")
    return int(value)


def peer_lost(cause: str = "") -> None:
    """Print :data:`MESSAGE` (with ``cause`` when known) and exit at once with :data:`EXIT_PEER_LOST`."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    line = f"{MESSAGE} ({cause})" if cause else MESSAGE
    os.write(_real_stderr if _real_stderr is not None else 2, (line + "\n").encode())
    os._exit(EXIT_PEER_LOST)


def no_heartbeat_cause(env) -> str:
    """What :func:`peer_lost` adds when the coordinator lost a process's heartbeats.

    It died, hung, or its host paused: a death is sometimes noticed first this way too.
    """
    return (
        f"a process stopped sending heartbeats (timeout {heartbeat_timeout(env)} s): if its host was "
        "only busy or paused, set GPTJAX_HEARTBEAT_TIMEOUT to more seconds"
    )


def caused_by_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer process went away."""
    return _real_stderr is not None and bool(_LOST_CONNECTION.search(str(error)))


def filter_native_output() -> None:
    """Route descriptors 2 and 1 (Python's and C++'s stderr and stdout) through filters.

    stderr: the first coordination-service failure line ends the process (:func:`peer_lost`).
    stdout: Gloo's "[Gloo] Rank R is connected to N peer ranks" lines, which its C++ code
    prints on every process of a CPU run, are dropped. Idempotent.
    """
    global _real_stderr
    if _real_stderr is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _real_stderr = os.dup(2)
    real_stdout = os.dup(1)
    threads = [_route(2, _real_stderr, _stderr_line), _route(1, real_stdout, _stdout_line)]

    def restore():  # at exit: the lines still in the pipes reach the terminal
        import jax

        # JAX's shutdown barrier (its own atexit hook, which would run after this one)
        # fails loudly when a peer died at the end: run it while the filter is on.
        try:
            jax.distributed.shutdown()
        except Exception:  # the barrier failed: a peer died at the end
            peer_lost()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(_real_stderr, 2)  # closes our write ends: the threads read to the end
        os.dup2(real_stdout, 1)
        for thread in threads:
            thread.join(timeout=2)

    atexit.register(restore)


def _route(fd: int, out: int, on_line) -> threading.Thread:
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    thread = threading.Thread(target=_forward, args=(read_end, out, on_line), daemon=True)
    thread.start()
    return thread


def _forward(read_end: int, out: int, on_line) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_line(line, out)
            if pending and not b"[Gloo]".startswith(pending[:6]):  # e.g. a progress bar's \r update
                os.write(out, pending)
                pending = b""
        if pending:
            on_line(pending, out)


def _stderr_line(line: bytes, out: int) -> None:
    text = line.decode("utf-8", "replace")
    if _PEER_FAILURE.match(text):
        peer_lost(no_heartbeat_cause(os.environ) if _NO_HEARTBEAT in text else "")
    os.write(out, line + b"\n")


def _stdout_line(line: bytes, out: int) -> None:
    if not _GLOO_CONNECTED.match(line):
        os.write(out, line + b"\n")
