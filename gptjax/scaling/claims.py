"""Who trains a run: numbered claim files in its run directory, created atomically.

A process (a local worker, a SLURM array task) that is about to train a run claims its
directory first: it creates ``RUN_DIR/claims/<n+1>.json`` with ``O_CREAT | O_EXCL`` where
``n`` is the newest claim, and only after judging claim ``n`` dead (its SLURM job left the
queue, or its local process exited). Two claimants that both judge ``n`` dead race for the
same file name and exactly one wins; the other re-reads, finds a live claim and leaves the
run alone. No rename, no lock file, nothing to clean up after a crash: the claims are also
the run's history (which jobs trained it, and when).

A requeued SLURM job keeps its job id, so it takes its own claim back (a new number).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

CLAIMS = "claims"
# squeue states of a job that is still waiting or working (anything else has ended).
LIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
}  # fmt: skip


def me() -> dict[str, Any]:
    """This process as a claim owner: its SLURM job (array task) if it runs in one."""
    env = os.environ
    owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    if env.get("SLURM_JOB_ID"):
        owner["job"] = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID"):
            owner["label"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        owner["restart"] = int(env.get("SLURM_RESTART_COUNT", "0"))
    else:
        owner["start"] = _start_time(os.getpid())
    return owner


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every claim of a run, oldest first (a half-written one is skipped)."""
    directory = Path(run_dir) / CLAIMS
    out = []
    for n in sorted(int(p.stem) for p in directory.glob("*.json") if p.stem.isdigit()):
        try:
            out.append({"n": n, **json.loads((directory / f"{n}.json").read_text())})
        except (OSError, json.JSONDecodeError):
            continue
    return out


def latest(run_dir: str | Path) -> dict[str, Any] | None:
    claims = history(run_dir)
    return claims[-1] if claims else None


def alive(claim: dict[str, Any], queue: dict[str, dict] | None = None) -> bool:
    """Whether a claim's owner may still be training: its SLURM job is in the queue (or
    the queue cannot be read: assume so, never train a run twice), or its local process
    is the same process and still runs. A released claim is dead."""
    if "ended" in claim:
        return False
    if "job" in claim:
        state = job_state(claim["job"], queue)
        return state is None or state in LIVE_STATES
    if claim.get("host") != socket.gethostname():
        return True  # another machine's process: nothing here can tell
    start = claim.get("start")
    return start is not None and _start_time(claim["pid"]) == start


def job_state(job: str, queue: dict[str, dict] | None = None) -> str | None:
    """A job's squeue state, "" when it has left the queue, None when squeue is absent."""
    if queue is not None:
        return queue.get(job, {}).get("state", "")
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # "Invalid job id": purged from the controller's memory
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def claim(
    run_dir: str | Path, owner: dict[str, Any] | None = None, queue: dict[str, dict] | None = None
) -> dict[str, Any] | None:
    """Claim ``run_dir`` for ``owner`` (default: this process); the claim, or None when a
    live owner holds it. A SLURM job re-claims what it claimed before a requeue. ``queue``:
    as for :func:`alive` (None: ask squeue)."""
    owner = owner or me()
    directory = Path(run_dir) / CLAIMS
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        held = latest(run_dir)
        mine = held is not None and "job" in owner and held.get("job") == owner["job"]
        if held is not None and not mine and alive(held, queue):
            return None
        n = held["n"] + 1 if held else 1
        try:
            fd = os.open(directory / f"{n}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            time.sleep(0.05)  # another claimant won this number; judge its claim next
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        return {"n": n, **owner}
    return None


def release(run_dir: str | Path, held: dict[str, Any]) -> None:
    """Mark a claim ended (its owner is done with the run, whatever the outcome). A SLURM
    task's claim needs no release: its job leaving the queue ends it."""
    path = Path(run_dir) / CLAIMS / f"{held['n']}.json"
    record = {k: v for k, v in held.items() if k != "n"}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**record, "ended": time.time()}))
    tmp.replace(path)


def clear_partial(run_dir: str | Path) -> None:
    """Before training a run that has no checkpoint: remove what an attempt killed before
    its first checkpoint left (logs, metrics, an error), keeping the claims and timing."""
    run_dir = Path(run_dir)
    from gptjax import checkpoint  # orbax (and JAX) load only here, before training

    if checkpoint.steps(run_dir / "checkpoints"):
        return
    for path in run_dir.iterdir() if run_dir.is_dir() else []:
        if path.name in (CLAIMS, "timing.json"):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])
