"""Running a sweep on this machine: in this process (:func:`run_sweep`), or as separate
worker processes (:func:`run_workers`, ``gptjax sweep --local-workers K``) that run
exactly what a SLURM array task runs (:mod:`gptjax.scaling.task`), so a laptop and a
cluster share one code path: the same claim, the same resume, the same records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from gptjax.errors import GptjaxError
from gptjax.scaling.results import table
from gptjax.scaling.sweep import Run, Sweep, default_dir, expand, record
from gptjax.scaling.task import EX_INTERRUPTED, finished, train_run


class SweepResult(NamedTuple):
    """What :func:`run_sweep` and :func:`run_workers` return."""

    sweep_dir: Path
    table: Path
    rows: list[dict[str, Any]]


def prepare(sweep: Sweep, sweep_dir: str | Path | None) -> tuple[Path, list[Run], list[Run]]:
    """Record the sweep in its directory and build every token store the unfinished runs
    need (once, before parallel runs could race on them): the directory, runs, runs to do."""
    from gptjax import data as data_lib

    sweep_dir = Path(sweep_dir or default_dir(sweep))
    runs = expand(sweep, sweep_dir)
    record(sweep_dir, sweep, runs)
    todo = [r for r in runs if not finished(r)]
    for data in {json.dumps(dataclasses.asdict(r.config.data)): r.config.data for r in todo}.values():
        data_lib.prepare(data)
    return sweep_dir, runs, todo


def run_sweep(sweep: Sweep, sweep_dir: str | Path | None = None, *, devices=None) -> SweepResult:
    """Train every run of ``sweep`` that has not finished in this process, then write
    ``results.csv``.

    Runs go one after another, or ``sweep.concurrent`` at a time in threads, each thread
    on its own disjoint slice of ``devices`` (one process keeps one view of the
    accelerators, and the compiled-step caches are shared). Every run is validated
    (config and mesh) before any starts. A run that raises is recorded as ``failed``
    (``error.txt``) and the sweep goes on; a run stopped by SIGTERM/SIGINT (sequential
    sweeps) stops the sweep. Each run is claimed first, so a run another process is
    training is left alone.

    Args:
        sweep: The sweep.
        sweep_dir: Where runs and the table go (default ``sweeps/<name>``). A directory
            written by a different sweep is rejected.
        devices: Devices to train on (default: all).
    """
    import jax

    from gptjax import sharding
    from gptjax.train import build

    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % sweep.concurrent:
        raise GptjaxError(
            f"sweep concurrent ({sweep.concurrent}) must divide the device count ({len(devices)})"
        )
    size = len(devices) // sweep.concurrent
    groups = [devices[i * size : (i + 1) * size] for i in range(sweep.concurrent)]
    for run in expand(sweep, sweep_dir or default_dir(sweep)):  # every mesh and shape problem first
        try:
            build(run.config, sharding.make_mesh(run.config.mesh, devices=groups[0]))
        except GptjaxError as e:
            raise GptjaxError(f"sweep {sweep.name!r}: run {run.hash} {run.point} is invalid: {e}") from None
    sweep_dir, runs, todo = prepare(sweep, sweep_dir)
    progress = _Progress(runs, todo, sweep_dir, sweep.concurrent)
    lock, stop = threading.Lock(), threading.Event()
    queue = iter(todo)

    def worker(group) -> None:
        while not stop.is_set():
            with lock:
                run = next(queue, None)
            if run is None:
                return
            progress.start(run)
            status = train_run(run, mesh=sharding.make_mesh(run.config.mesh, devices=group))
            progress.done(run, status)
            if status == "interrupted":
                stop.set()

    if sweep.concurrent == 1:
        worker(groups[0])  # in the main thread, so train()'s SIGTERM handling applies
    else:
        with ThreadPoolExecutor(sweep.concurrent) as pool:
            for future in [pool.submit(worker, g) for g in groups]:
                future.result()
    return SweepResult(sweep_dir, sweep_dir / "results.csv", table(sweep_dir))


def run_workers(sweep: Sweep, sweep_dir: str | Path | None = None, *, workers: int) -> SweepResult:
    """Train the unfinished runs as ``workers`` separate processes at a time on this
    machine (``python -m gptjax.scaling.task``, the command a SLURM array task runs).

    Each worker inherits this process's environment (and so its devices: give each worker
    its own accelerators through the environment, or use one worker per machine). A
    worker's output goes to ``SWEEP_DIR/logs/<hash>.log``. SIGTERM/SIGINT reach every
    worker, which saves and stops; no new run starts after them.
    """
    if workers < 1:
        raise GptjaxError(f"--local-workers ({workers}) must be >= 1")
    sweep_dir, runs, todo = prepare(sweep, sweep_dir)
    progress = _Progress(runs, todo, sweep_dir, workers)
    (sweep_dir / "logs").mkdir(exist_ok=True)
    queue, active, stopping = list(todo), {}, []

    def forward(signum, frame):
        stopping.append(signum)
        for proc, _ in active.values():
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or active:
            while queue and len(active) < workers and not stopping:
                run = queue.pop(0)
                progress.start(run)
                with open(sweep_dir / "logs" / f"{run.hash}.log", "ab") as log:
                    cmd = [sys.executable, "-m", "gptjax.scaling.task", str(sweep_dir), run.hash]
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
                active[run.hash] = (proc, run)
            if stopping:
                queue.clear()
            for h, (proc, run) in list(active.items()):
                code = proc.poll()
                if code is not None:
                    del active[h]
                    status = {0: "finished", EX_INTERRUPTED: "interrupted"}.get(code, "failed")
                    progress.done(run, status if status != "finished" or finished(run) else "skipped")
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return SweepResult(sweep_dir, sweep_dir / "results.csv", table(sweep_dir))


class _Progress:
    """``run k/N`` lines, each run's time, and an ETA from the mean time of finished runs."""

    def __init__(self, runs: list[Run], todo: list[Run], sweep_dir: Path, parallel: int):
        self.total, self.todo, self.started, self.times = len(runs), len(todo), {}, []
        self.parallel, self.completed = parallel, 0
        self.index = {r.hash: i + 1 for i, r in enumerate(runs)}
        self.lock = threading.Lock()
        print(f"gptjax sweep: {len(runs)} runs in {sweep_dir}, {len(runs) - len(todo)} finished", flush=True)

    def start(self, run: Run) -> None:
        with self.lock:
            self.started[run.hash] = time.perf_counter()
            point = " ".join(f"{k}={v}" for k, v in run.point.items())
        print(f"gptjax sweep: run {self.index[run.hash]}/{self.total} {run.hash} {point}", flush=True)

    def done(self, run: Run, status: str) -> None:
        with self.lock:
            spent = time.perf_counter() - self.started.pop(run.hash)
            self.completed += 1
            if status == "finished":
                self.times.append(spent)
            left = self.todo - self.completed
            eta = sum(self.times) / len(self.times) * left / self.parallel if self.times and left else 0.0
        tail = f"; ETA {eta / 60:.1f} min for {left} more" if eta else ""
        k = self.index[run.hash]
        print(f"gptjax sweep: run {k}/{self.total} {status} in {spent:.0f}s{tail}", flush=True)
