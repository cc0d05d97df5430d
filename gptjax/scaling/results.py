"""What a sweep directory says about its runs: each run's state, ``results.csv``, and the
``gptjax sweep --status`` table.

A run is ``finished`` (``result.json`` at its last step), ``running`` or ``queued`` (a
live claim, or a SLURM array task of this sweep waiting in the queue), ``failed``
(``error.txt``), ``interrupted`` (started, no live owner: it resumes from its newest
checkpoint when resubmitted) or ``pending`` (never started). The queue comes from
``squeue`` where it is installed; ``sacct`` adds how a gone job ended where accounting is
enabled; without either the table is built from the directory alone.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from gptjax.config import flops_per_token, param_counts
from gptjax.scaling import claims
from gptjax.scaling.sweep import Run, read
from gptjax.scaling.task import finished

COLUMNS = (
    "hash", "status", "n_layer", "n_embd", "n_head", "lr", "seed", "steps", "params_non_embedding",
    "params_total", "tokens", "flops", "flops_model", "train_loss", "val_loss", "wall_time_s", "point",
)  # fmt: skip
STATES = ("pending", "queued", "running", "finished", "failed", "interrupted")


def run_state(run: Run, queue: dict[str, dict] | None = None, waiting: dict[str, dict] | None = None) -> dict:
    """One run's status, step reached, last training loss, SLURM job and time spent.

    ``queue``: squeue's jobs by id and by array label (``A_i``), from
    :func:`gptjax.scaling.slurm.queue` (None: ask squeue per claim). ``waiting``: run hash
    to the squeue row of a task of this sweep in the queue that has not claimed it yet.
    """
    run_dir = Path(run.config.train.run_dir)
    claim = claims.latest(run_dir)
    job = (claim or {}).get("label") or (claim or {}).get("job", "")
    step, loss = _last_logged(run_dir)
    timing = run_dir / "timing.json"
    elapsed = json.loads(timing.read_text())["wall_time_s"] if timing.exists() else 0.0
    live = claim is not None and claims.alive(claim, queue)
    if finished(run):
        status = "finished"
    elif live and "job" in claim:
        state = claims.job_state(claim["job"], queue)
        status = "running" if state in (None, "RUNNING", "COMPLETING", "CONFIGURING") else "queued"
    elif live:
        status = "running"
    elif waiting and run.hash in waiting:
        row = waiting[run.hash]
        status, job = ("running" if row["state"] == "RUNNING" else "queued"), row["label"]
    elif (run_dir / "error.txt").exists():
        status = "failed"
    elif claim is not None or _has_checkpoint(run_dir):
        status = "interrupted"
    else:
        status = "pending"
    if status == "running" and claim is not None:
        elapsed += time.time() - claim["since"]
    if status in ("interrupted", "failed") and claim is not None and "job" in claim:
        from gptjax.scaling.slurm import ended

        how = ended(claim["job"])  # sacct, where accounting is enabled
        job += f" ({how})" if how else ""
    return {"hash": run.hash, "status": status, "step": step, "steps": run.config.train.steps,
            "loss": loss, "job": job, "elapsed_s": elapsed, "point": run.point}  # fmt: skip


def metrics(run_dir: Path) -> dict[str, dict[int, dict]]:
    """Train and eval rows of a run by step (a resumed run's re-logged steps: the last wins)."""
    train_rows: dict[int, dict] = {}
    eval_rows: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a process killed mid-write
            continue
        (train_rows if "loss" in row else eval_rows if "val_loss" in row else {})[row["step"]] = row
    return {"train": dict(sorted(train_rows.items())), "eval": dict(sorted(eval_rows.items()))}


def _last_logged(run_dir: Path) -> tuple[int, float]:
    """The step and loss of the newest training row (0, nan before the first)."""
    rows = metrics(run_dir)["train"]
    step = max(rows, default=0)
    return step, rows[step]["loss"] if rows else math.nan


def _has_checkpoint(run_dir: Path) -> bool:
    from gptjax import checkpoint  # orbax (and JAX) load only when a status needs them

    return bool(checkpoint.steps(run_dir / "checkpoints"))


def states(sweep_dir: str | Path, runs: list[Run] | None = None) -> list[dict]:
    """:func:`run_state` of every run, with the SLURM queue read once (where present)."""
    from gptjax.scaling import slurm

    runs = runs if runs is not None else read(sweep_dir)[1]
    queue = slurm.queue()
    waiting = slurm.waiting(sweep_dir, runs, queue) if queue is not None else {}
    return [run_state(r, queue, waiting) for r in runs]


def table(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The results table of a sweep directory (one row per run); rewrites ``results.csv``."""
    sweep_dir = Path(sweep_dir)
    _, runs = read(sweep_dir)
    rows = []
    for run, state in zip(runs, states(sweep_dir, runs), strict=True):
        m, tc, run_dir = run.config.model, run.config.train, Path(run.config.train.run_dir)
        n, tokens = param_counts(m)["non_embedding"], tc.steps * tc.batch_size * m.block_size
        status = state["status"]
        result = json.loads((run_dir / "result.json").read_text()) if status == "finished" else {}
        timing = run_dir / "timing.json"
        rows.append(
            {
                "hash": run.hash, "status": status, "n_layer": m.n_layer, "n_embd": m.n_embd,
                "n_head": m.n_head, "lr": run.config.optim.lr, "seed": tc.seed, "steps": tc.steps,
                "params_non_embedding": n, "params_total": param_counts(m)["total"], "tokens": tokens,
                "flops": 6.0 * n * tokens, "flops_model": flops_per_token(m)["total"] * tokens,
                "train_loss": result.get("loss", math.nan), "val_loss": result.get("val_loss", math.nan),
                "wall_time_s": json.loads(timing.read_text())["wall_time_s"] if timing.exists() else math.nan,
                "point": json.dumps(run.point),
            }
        )  # fmt: skip
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_status(rows: list[dict]) -> str:
    """The ``gptjax sweep --status`` table, then one line of counts."""

    def elapsed(s: float) -> str:
        s = int(s)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s else "-"

    header = ("run", "status", "step", "loss", "job", "elapsed", "point")
    lines = [
        (r["hash"], r["status"], f"{r['step']}/{r['steps']}",
         f"{r['loss']:.4f}" if math.isfinite(r["loss"]) else "-", r["job"] or "-", elapsed(r["elapsed_s"]),
         " ".join(f"{k}={v}" for k, v in r["point"].items()))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = [
        "  ".join(f"{x:<{w}}" for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    ]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATES}
    out.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" ({len(rows)} runs)")
    return "\n".join(out)
