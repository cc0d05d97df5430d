"""Run metrics: MFU against peak FLOPs, and the metrics writers (JSONL, TensorBoard, console).

Only process 0 writes; other processes get a logger that does nothing.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import GptjaxError
from gptjax.targets import GENERATIONS

# Dense peak FLOP/s per device (per chip for TPUs). TPU figures are the generations' table
# in gptjax.targets (the one place they are written); fp32 on TPUs runs through the MXU's
# bf16 passes, so it is the bf16 peak / 3 (XLA's default "highest" fp32 precision uses 3
# passes). GPU figures are from NVIDIA's data sheets; fp32 is the non-tensor-core rate.
_TPU_KINDS = {  # jax device_kind prefix -> generation
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5p": "v5p",
    "TPU v5": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    **{
        kind: {"bfloat16": GENERATIONS[gen].peak_flops, "float32": GENERATIONS[gen].peak_flops / 3}
        for kind, gen in _TPU_KINDS.items()
    },
    "NVIDIA A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
}


@functools.cache
def measured_cpu_peak() -> float:
    """FLOP/s of a jitted float32 matmul on this machine's CPU, measured once and cached.

    A probe at every start reads whatever load the machine has at that moment (0.106 and
    0.199 TFLOP/s on one machine gave two runs at the same tokens/s MFUs of 36% and 21%),
    so the first measurement is kept in ``$GPTJAX_CACHE_DIR`` (else ``~/.cache/gptjax``)
    ``/cpu_peak_flops.json``, keyed by host, CPU model and core count; delete the file to
    measure again.
    """
    path = Path(os.environ.get("GPTJAX_CACHE_DIR") or "~/.cache/gptjax").expanduser() / "cpu_peak_flops.json"
    key = f"{platform.node()} | {_cpu_model()} | {os.cpu_count()} cores"
    try:
        known = json.loads(path.read_text())
        if isinstance(known.get(key), float):
            return known[key]
    except (OSError, ValueError, AttributeError):
        known = {}
    peak = _matmul_probe()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({**known, key: peak}, indent=1))
        os.replace(temporary, path)
    except OSError:  # a read-only home: measure again next time
        pass
    return peak


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matmul_probe(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 matmul on the default CPU device (a short probe)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(dtype: str, configured: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number came from.

    CPU devices of one process (``--xla_force_host_platform_device_count``) share its
    cores, and the probe already uses all of them: each device's peak is the probe's
    rate divided by their number, so that devices x peak is the machine's.
    """
    if configured > 0:
        return configured, "configured"
    device = jax.devices()[0]
    if device.platform == "cpu":
        n = jax.local_device_count()
        shared = f", shared by {n} CPU devices" if n > 1 else ""
        return measured_cpu_peak() / n, f"measured (float32 matmul probe{shared})"
    for kind, peaks in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind) and dtype in peaks:
            return peaks[dtype], f"table ({kind}, {dtype})"
    return 0.0, f"unknown device kind {device.device_kind!r}: set train.peak_flops"


class MetricsLogger:
    """Writes metric rows to ``metrics.jsonl``, TensorBoard and the console (process 0)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        wandb_project: str = "",
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if enabled and wandb_project:
            self._wandb = _start_wandb(run_dir, wandb_project, config)
            print(f"gptjax: logging to W&B project {wandb_project}: {self._wandb.url or self._wandb.dir}")
        self._t0 = time.perf_counter()
        self._origin: tuple[int, float] | None = None  # (step, time) the ETA is measured from
        self._bar = None
        if enabled and sys.stdout.isatty():
            # A live bar under the log lines (rich redirects prints above it). Its columns fit
            # 80 characters: "train ━━━━ 400/800 loss 2.1473 0:01:23".
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total_steps, stats="")
            self._bar.start()
        if enabled:
            with self._writing(run_dir):
                self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
                try:
                    self._tb = _TensorBoard(run_dir / "tensorboard")
                except ImportError:  # TensorBoard files are optional; metrics.jsonl is not
                    self._tb = None

    @contextmanager
    def _writing(self, where: Path):
        """A failed metrics write (full disk, lost permissions) is one clear error."""
        try:
            yield
        except OSError as e:
            raise GptjaxError(
                f"writing metrics in {where} failed ({e.strerror or e}): free disk space or fix "
                "permissions, then re-run (it resumes from the last checkpoint)"
            ) from e

    def truncate(self, step: int, *, redo_eval: bool = False) -> None:
        """Drop rows after ``step`` (a resumed run logs those steps again), and with
        ``redo_eval`` the evaluation rows at ``step``."""
        if not self.enabled:
            return
        path = Path(self._jsonl.name)
        with self._writing(path.parent):
            self._rewrite(path, step, redo_eval)

    def _rewrite(self, path: Path, step: int, redo_eval: bool) -> None:
        self._jsonl.close()
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                at = row.get("step", 0)
                if at < step or at == step and not (redo_eval and "val_loss" in row):
                    rows.append(line)
            except json.JSONDecodeError:  # the last line of a process killed mid-write
                continue
        # Replaced, not rewritten in place: a kill here must not leave an empty file.
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in rows))
        os.replace(temporary, path)
        self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in row.items()}}
        with self._writing(Path(self._jsonl.name).parent):
            self._jsonl.write(json.dumps(row) + "\n")
            if self._tb is not None:
                self._tb.write(step, {k: v for k, v in row.items() if k != "step"})
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}, step=step
            )

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"gptjax: warning: {message}", file=sys.stderr, flush=True)

    def begin(self, step: int) -> None:
        """The training loop starts (or resumes) at ``step``: the ETA counts from here."""
        self._origin = (step, time.perf_counter())
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def advance(self, step: int) -> None:
        """Step ``step`` was dispatched: move the bar (every step, not only logged ones)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def eta(self, step: int) -> float | None:
        """Seconds left at the rate since :meth:`begin` (None before any step is done)."""
        if self._origin is None or step <= self._origin[0]:
            return None
        first, t = self._origin
        return (time.perf_counter() - t) / (step - first) * (self.total_steps - step)

    def progress(self, step: int, row: dict[str, Any]) -> None:
        """One console line per logged step: step, loss, throughput, MFU, elapsed and ETA."""
        if not self.enabled:
            return
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f")):
            if key in row:
                parts.append(f"{key} {row[key]:{fmt}}")
        if "val_tokens" in row:  # which validation loss: the full pass, or the first tokens of it
            scope = "full pass" if row.get("val_full_pass") else "first"
            parts[-1] += f" ({scope} {row['val_tokens']:,} tokens)"
        if "tokens_per_sec" in row:
            parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
        if row.get("mfu"):
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        parts.append(f"{time.perf_counter() - self._t0:.0f}s")
        eta = self.eta(step)
        if eta is not None and step < self.total_steps and "loss" in row:
            parts.append(f"eta {_clock(eta)}")
        print(" | ".join(parts), file=sys.stdout, flush=True)
        if self._bar is not None and "loss" in row:
            self._bar.update(self._task, completed=step, stats=f"loss {row['loss']:.4f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        for writer in (self._jsonl, self._tb):
            try:
                if writer is not None:
                    writer.close()
            except OSError:  # already reported by the write that failed
                pass
        if self._wandb is not None:
            self._wandb.finish()


class _TensorBoard:
    """TensorBoard scalars, written synchronously.

    tensorboardX's ``SummaryWriter`` writes from a thread behind a bounded queue; when that
    thread dies (a full disk) every later ``add_scalar`` blocks forever. Writing here raises
    the ``OSError`` in the training thread instead.
    """

    def __init__(self, directory: Path):
        with _torch_hidden():
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

        directory.mkdir(parents=True, exist_ok=True)
        self._event, self._scalar = Event, scalar
        self._writer = EventsWriter(str(directory / "events"))

    def write(self, step: int, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, int | float):
                event = self._event(summary=self._scalar(key, value), step=step, wall_time=time.time())
                self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


@contextmanager
def _torch_hidden() -> Iterator[None]:
    """Hide an installed but not yet imported torch from the imports inside.

    Importing tensorboardX tries ``import torch`` (to accept torch tensors), which costs
    ~0.9 s at every training start where torch is installed; scalars never need it.
    """
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _start_wandb(run_dir: Path, project: str, config: dict | None):
    """A Weights & Biases run for this run directory; a resumed run continues the same one."""
    try:
        import wandb
    except ImportError:
        raise GptjaxError(
            f"train.wandb_project={project!r} needs wandb: pip install wandb (or gptjax[wandb])"
        ) from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=project, id=run_id, name=run_dir.name, dir=str(run_dir), config=config, resume="allow"
    )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def interval_mean(losses: list) -> float:
    """The mean of a logging interval's per-step losses, skipped (non-finite) steps left out.

    An interval whose every step was skipped reports its last loss (non-finite), so a
    logged row never hides a bad step.
    """
    values = np.asarray(jax.device_get(losses), np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float(values[-1])


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


class StepTimer:
    """Where a step's time goes: waiting for data, compute, checkpoint stalls.

    Throughput counts only training time: evaluation and checkpoint saves are paused out.
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.paused = self.data_wait = self.ckpt_stall = 0.0
        self.first_step_done: float | None = None

    def wait(self, stream: Iterator) -> Iterator:
        while True:
            t = time.perf_counter()
            item = next(stream, None)
            self.data_wait += time.perf_counter() - t
            if item is None:
                return
            yield item

    @contextmanager
    def pause(self, stall: bool = False):
        t = time.perf_counter()
        yield
        elapsed = time.perf_counter() - t
        self.paused += elapsed
        if stall:
            self.ckpt_stall += elapsed

    def rates(self, steps: int, tokens_per_step: int, flops_per_tok: float, peak_total: float) -> dict:
        elapsed = time.perf_counter() - self.t0 - self.paused
        tokens_per_sec = steps * tokens_per_step / elapsed
        return {
            "tokens_per_sec": tokens_per_sec,
            "step_time": elapsed / steps,
            "mfu": flops_per_tok * tokens_per_sec / peak_total if peak_total else 0.0,
            "data_wait": self.data_wait / steps,
            "checkpoint_stall": self.ckpt_stall / steps,
            "compute_time": (elapsed - self.data_wait) / steps,  # saves are already paused out
        }


def peak_memory() -> dict:
    """Peak device memory where the backend reports it; else the process's peak RSS (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": stats["peak_bytes_in_use"]}
    import resource

    return {"peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
