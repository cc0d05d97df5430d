"""Run metrics: MFU against peak FLOPs, and the metrics writers (JSONL, TensorBoard, console).

Only process 0 writes; other processes get a logger that does nothing.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device (per chip for TPUs), from the vendors' data sheets.
# fp32 on TPUs runs through the MXU's bf16 passes; the figure given is the bf16 peak / 3
# (XLA's default "highest" fp32 precision uses 3 passes). GPU fp32 is the non-tensor-core rate.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 3},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 3},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12 / 3},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 3},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12 / 3},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12 / 3},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12 / 3},
    "NVIDIA A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
}


@functools.cache
def measured_cpu_peak(n: int = 1024, repeats: int = 10) -> float:
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
    """Peak FLOP/s of one device and where the number came from."""
    if configured > 0:
        return configured, "configured"
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured (float32 matmul probe)"
    for kind, peaks in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind) and dtype in peaks:
            return peaks[dtype], f"table ({kind}, {dtype})"
    return 0.0, f"unknown device kind {device.device_kind!r}: set train.peak_flops"


class MetricsLogger:
    """Writes metric rows to ``metrics.jsonl``, TensorBoard and the console (process 0)."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._t0 = time.perf_counter()
        if enabled:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard files are optional; metrics.jsonl is not
                self._tb = None

    def truncate(self, step: int) -> None:
        """Drop rows after ``step`` (a resumed run logs those steps again)."""
        if not self.enabled:
            return
        path = Path(self._jsonl.name)
        self._jsonl.close()
        rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in rows))
        self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in row.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"gptjax: warning: {message}", file=sys.stderr, flush=True)

    def progress(self, step: int, row: dict[str, Any]) -> None:
        """One console line per logged step: step, loss, throughput and MFU."""
        if not self.enabled:
            return
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f")):
            if key in row:
                parts.append(f"{key} {row[key]:{fmt}}")
        if "tokens_per_sec" in row:
            parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
        if row.get("mfu"):
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        parts.append(f"{time.perf_counter() - self._t0:.0f}s")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
