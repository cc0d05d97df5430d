"""A local multi-process launcher: try multi-host training on one machine.

``gptjax launch --processes 2 --devices-per-process 2 -- train CONFIG ...`` starts N
``gptjax`` processes on localhost, each with its own fake CPU devices, coordinated
through ``jax.distributed`` (gloo collectives). It forwards SIGTERM/SIGINT to all of
them; a launcher that is killed takes them with it (a parent-death signal); and if one
dies the others are stopped too: SIGTERM at once, SIGKILL after ``GRACE_SECONDS``, so
the launcher returns within about ``GRACE_SECONDS + 1`` seconds of the first failure
instead of hanging in a collective that will never complete.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from gptjax.errors import EXIT_PEER_LOST, GptjaxError

GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_cpu_devices(xla_flags: str, n_devices: int) -> str:
    """``XLA_FLAGS`` with the CPU device count set to ``n_devices`` and every other flag kept."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={n_devices}"])


def launch(args: Sequence[str], *, processes: int, devices_per_process: int = 1, port: int = 0) -> int:
    """Run ``gptjax ARGS`` as ``processes`` coordinated processes; return the exit code.

    Exit code: 0 when every process exits 0; otherwise the failed process's code (or 1
    when it died by a signal), after every other process has been stopped. A process that
    stopped because a peer was lost (exit code 3) is named only when no other failed.
    """
    if processes < 1 or devices_per_process < 1:
        raise GptjaxError(
            f"--processes ({processes}) and --devices-per-process ({devices_per_process}) must be >= 1"
        )
    if not args:
        raise GptjaxError("nothing to launch: give a gptjax command after --, e.g. -- train quickstart")
    port = port or _free_port()
    children: list[subprocess.Popen] = []
    for rank in range(processes):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), devices_per_process),
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(rank),
        }
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "gptjax.cli", *args], env=env, preexec_fn=_die_with_parent
            )
        )

    def forward(signum, frame):
        # SIGTERM for both: each process's JAX preemption service turns it into a stop at
        # a step all processes agree on.
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank, code = _first_cause(failed)
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                print(f"gptjax launch: process {rank} {how}; stopping the other processes", file=sys.stderr)
                _stop(children)
                return code if code > 0 else 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(_POLL_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _first_cause(failed: list[tuple[int, int]]) -> tuple[int, int]:
    """The failure to report: a process that died or failed, not one that stopped because of it.

    A peer that noticed the loss first (exit code 3) can be seen in the same poll as the
    process that died; the launcher names the dead one.
    """
    causes = [(rank, code) for rank, code in failed if code != EXIT_PEER_LOST]
    return (causes or failed)[0]


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the launcher dies, however the launcher dies.

    Without this a launcher killed with SIGKILL leaves its children training as orphans.
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere children outlive a killed launcher.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gptjax.launch``: the same as ``gptjax launch``."""
    from gptjax.cli import main as cli_main

    return cli_main(["launch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
