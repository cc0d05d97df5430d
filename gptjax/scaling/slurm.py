"""SLURM: a sweep as one job array (``gptjax sweep --slurm``), one training job
(``gptjax submit``), and the queue as the status table reads it.

Plain ``sbatch`` with a generated script, not a submission library: the script is written
where the runs are (``SWEEP_DIR/slurm/sweep.sbatch``, ``RUN_DIR/submit.sbatch``) and holds
everything a task does — the interpreter, the environment, the command — so users can read
it, edit an ``#SBATCH`` line and resubmit it by hand; nothing is pickled (a library like
submitit pickles a callable per task, which binds the job to the submitting Python and
hides the command). Every task runs ``python -m gptjax.scaling.task``, which claims its
run's directory before training (:mod:`gptjax.scaling.claims`), so a hand resubmission of
the whole array skips finished and running runs by itself.

Time limits and preemption: the script asks for ``--signal=B:USR1@N``. On USR1 (N seconds
before the limit) the batch shell sends SIGTERM to the training process(es), which save at
the next step and exit; the shell then requeues its own job (``scontrol requeue``, with
``--requeue``) and the requeued job resumes from that checkpoint. SIGTERM alone (scancel,
preemption by the scheduler) saves and exits without requeueing itself.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptjax.errors import GptjaxError
from gptjax.scaling import claims
from gptjax.scaling.sweep import Run

# What a job needs from the submitting environment (sbatch exports it all too; the script
# repeats these so that a hand resubmission from a fresh shell behaves the same).
_ENV_PREFIXES = ("GPTJAX_", "JAX_", "XLA_", "TIKTOKEN_", "HF_", "CUDA_VISIBLE_DEVICES", "TPU_")
_ENV_NAMES = ("PYTHONPATH", "VIRTUAL_ENV", "PATH")
COMMENT = "gptjax-sweep:"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlurmOptions:
    """The ``#SBATCH`` resources of each task (one run, or one training job).

    Attributes:
        partition, account: ``--partition``, ``--account`` ("" leaves the cluster's default).
        time: ``--time`` (``MM``, ``HH:MM:SS``, ``D-HH``; "" the partition's default).
        ntasks: Processes per run; more than 1 runs training under ``srun`` (multi-host).
        gpus_per_task, cpus_per_task: ``--gpus-per-task``, ``--cpus-per-task`` (0: unset).
        max_parallel: Array tasks running at once (``--array=...%N``; 0: no limit).
        signal_seconds: USR1 this long before the time limit: save, requeue, resume.
        extra: More ``#SBATCH`` options, e.g. ``("--constraint=a100", "--mem=64G")``.
    """

    partition: str = ""
    account: str = ""
    time: str = ""
    ntasks: int = 1
    gpus_per_task: int = 0
    cpus_per_task: int = 0
    max_parallel: int = 0
    signal_seconds: int = 120
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("ntasks", "gpus_per_task", "cpus_per_task", "max_parallel", "signal_seconds"):
            value = getattr(self, name)
            low = 1 if name == "ntasks" else 0
            if not isinstance(value, int) or value < low:
                raise GptjaxError(f"slurm {name} ({value!r}) must be an integer >= {low}")
        for line in self.extra:
            if not line.startswith("-") or "\n" in line:
                raise GptjaxError(f"slurm extra option {line!r} must be one sbatch option, e.g. '--mem=64G'")

    @classmethod
    def merge(cls, defaults: dict[str, Any], given: dict[str, Any]) -> SlurmOptions:
        """The sweep file's defaults with the command line's options (not None) on top."""
        fields = {**defaults, **{k: v for k, v in given.items() if v not in (None, [], ())}}
        fields["extra"] = tuple(defaults.get("extra", ())) + tuple(given.get("extra") or ())
        return cls(**fields)

    def directives(self) -> list[str]:
        pairs = [("partition", self.partition), ("account", self.account), ("time", self.time),
                 ("gpus-per-task", self.gpus_per_task), ("cpus-per-task", self.cpus_per_task)]  # fmt: skip
        lines = [f"--ntasks={self.ntasks}"] + [f"--{k}={v}" for k, v in pairs if v]
        signal = f"--signal=B:USR1@{self.signal_seconds}"
        return [*lines, signal, "--requeue", "--open-mode=append", *self.extra]


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise GptjaxError(f"{tool} is not installed: run on a SLURM login node, or use --local-workers K")
    return path


def _environment() -> list[str]:
    env = os.environ
    names = sorted(k for k in env if k in _ENV_NAMES or k.startswith(_ENV_PREFIXES))
    return [f"export {k}={shlex.quote(env[k])}" for k in names]


def _script(header: list[str], directives: list[str], body: list[str], requeue_codes: str) -> str:
    """A batch script: directives, the environment, then ``body`` (which sets ``TRAIN``,
    the training command) run with USR1 -> save and requeue, TERM -> save and stop."""
    return "\n".join(
        ["#!/bin/bash", *(f"# {line}" for line in header), *(f"#SBATCH {d}" for d in directives),
         "set -u", *_environment(), "export PYTHONUNBUFFERED=1  # the log shows progress as it happens",
         f"PYTHON={shlex.quote(sys.executable)}", *body,
         "requeue=0", "child=",
         "# USR1 (the time limit is near): save, then requeue this job; TERM: save and stop.",
         """trap 'requeue=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' USR1""",
         """trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM""",
         '"${TRAIN[@]}" &', "child=$!",
         'while true; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done',
         f'if [ "$requeue" = 1 ] && [[ " {requeue_codes} " == *" $rc "* || $rc -gt 128 ]]; then',
         '  echo "gptjax: time limit near; saved, requeueing job $SLURM_JOB_ID"',
         '  scontrol requeue "$SLURM_JOB_ID"', "fi", 'exit "$rc"', ""]
    )  # fmt: skip


def _train_command(module_args: list[str], ntasks: int) -> list[str]:
    srun = ["srun", "--kill-on-bad-exit=1"] if ntasks > 1 else []
    return [*srun, "$PYTHON", *module_args]


def _words(cmd: list[str]) -> str:
    return " ".join('"$PYTHON"' if w == "$PYTHON" else shlex.quote(w) for w in cmd)


# --------------------------------------------------------------------------------------
# A sweep as a job array


def array_script(sweep_name: str, sweep_dir: Path, runs: list[Run], options: SlurmOptions) -> str:
    """The job array of every run of the sweep (task i trains run i); ``gptjax sweep
    --slurm`` submits only the indices that need training with ``--array``."""
    sweep_dir = sweep_dir.resolve()
    header = [
        f"gptjax sweep {sweep_name}: {len(runs)} runs, one array task each (task i: run i below).",
        "Resubmit by hand: sbatch THIS_FILE (finished runs and runs a live job holds exit at once).",
    ]
    directives = [
        f"--job-name=gptjax-{sweep_name}", f"--array=0-{len(runs) - 1}", f"--comment={COMMENT}{sweep_dir}",
        f"--output={sweep_dir}/slurm/%A_%a.out", f"--chdir={Path.cwd()}", *options.directives(),
    ]  # fmt: skip
    task = ["-m", "gptjax.scaling.task", str(sweep_dir)]
    body = [f"RUNS=({' '.join(r.hash for r in runs)})", 'RUN="${RUNS[$SLURM_ARRAY_TASK_ID]}"']
    if options.ntasks == 1:  # the task claims the run itself: exits 0 if finished or held
        body.append(f'TRAIN=({_words(_train_command(task, 1))} "$RUN")')
    else:  # claim once here, then every process trains
        body += [
            "# Claim the run (exit 3: finished, or a live job trains it), then train it.",
            f'{_words(["$PYTHON", *task[:2], "--claim-only", task[2]])} "$RUN" || exit 0',
            f'TRAIN=({_words(_train_command([*task[:2], "--no-claim", task[2]], options.ntasks))} "$RUN")',
        ]
    return _script(header, directives, body, "75")


def submit_sweep(sweep_name: str, sweep_dir: Path, runs: list[Run], options: SlurmOptions) -> dict[str, Any]:
    """Write ``SWEEP_DIR/slurm/sweep.sbatch`` and submit the runs that need training:
    pending, interrupted and failed ones with no live job; finished, running and queued
    runs are left alone. Returns ``{"job": id or None, "submitted": hashes, "skipped": {status: n}}``."""
    from gptjax.scaling.results import states

    sbatch = _require("sbatch")
    (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script = sweep_dir / "slurm" / "sweep.sbatch"
    script.write_text(array_script(sweep_name, sweep_dir, runs, options))
    rows = states(sweep_dir, runs)
    todo = [i for i, row in enumerate(rows) if row["status"] in ("pending", "interrupted", "failed")]
    skipped: dict[str, int] = {}
    for row in rows:
        if row["status"] not in ("pending", "interrupted", "failed"):
            skipped[row["status"]] = skipped.get(row["status"], 0) + 1
    if not todo:
        return {"job": None, "submitted": [], "skipped": skipped, "script": script}
    array = ",".join(map(str, todo)) + (f"%{options.max_parallel}" if options.max_parallel else "")
    job = _sbatch([sbatch, "--parsable", f"--array={array}", str(script)])
    with open(sweep_dir / "slurm" / "submissions.jsonl", "a") as f:
        f.write(json.dumps({"job": job, "indices": todo, "time": time.time()}) + "\n")
    return {"job": job, "submitted": [runs[i].hash for i in todo], "skipped": skipped, "script": script}


def _sbatch(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise GptjaxError(f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


# --------------------------------------------------------------------------------------
# One training job


def job_script(config: str, overrides: Sequence[str], run_dir: Path, name: str, options: SlurmOptions) -> str:
    """``gptjax train CONFIG OVERRIDES`` as a batch job that requeues itself at its time limit."""
    run_dir = run_dir.resolve()
    if Path(config).is_file():
        config = str(Path(config).resolve())
    args = ["-m", "gptjax.cli", "train", config, *overrides, f"train.run_dir={run_dir}"]
    header = [f"gptjax submit: one training job ({name}) into {run_dir}.", "Resubmit: sbatch THIS_FILE"]
    directives = [f"--job-name=gptjax-{name}", f"--output={run_dir}/slurm-%j.out", f"--chdir={Path.cwd()}",
                  *options.directives()]  # fmt: skip
    return _script(header, directives, [f"TRAIN=({_words(_train_command(args, options.ntasks))})"], "0")


def submit(config: str, overrides: Sequence[str], options: SlurmOptions, *, dry_run: bool = False) -> dict:
    """Write ``RUN_DIR/submit.sbatch`` for one training job and submit it (unless
    ``dry_run``). Returns ``{"job": id or None, "script": path, "run_dir": path}``."""
    from gptjax.config import load_config

    cfg = load_config(config, list(overrides))  # every config error before anything is written
    run_dir = Path(cfg.train.run_dir or Path("runs") / cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "submit.sbatch"
    script.write_text(job_script(config, overrides, run_dir, cfg.name, options))
    job = None if dry_run else _sbatch([_require("sbatch"), "--parsable", str(script)])
    return {"job": job, "script": script, "run_dir": run_dir}


# --------------------------------------------------------------------------------------
# The queue


def queue() -> dict[str, dict] | None:
    """This user's jobs in the queue, by job id and by array label (``A_i``); None when
    squeue is absent or cannot reach a controller."""
    if shutil.which("squeue") is None:
        return None
    cmd = ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%A|%i|%T|%M|%k"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    jobs: dict[str, dict] = {}
    for line in out.stdout.splitlines():
        job, label, state, elapsed, comment = [*line.split("|", 4), ""][:5]
        row = {"job": job, "label": label, "state": state, "elapsed": elapsed, "comment": comment}
        jobs[job] = jobs[label] = row
    return jobs


def waiting(sweep_dir: str | Path, runs: list[Run], jobs: dict[str, dict]) -> dict[str, dict]:
    """Run hash -> squeue row of this sweep's array tasks in the queue (submitted by
    gptjax or by hand: the array's comment names the sweep directory)."""
    mark = f"{COMMENT}{Path(sweep_dir).resolve()}"
    out = {}
    for row in jobs.values():
        index = row["label"].partition("_")[2]
        live = row["comment"] == mark and row["state"] in claims.LIVE_STATES
        if live and index.isdigit() and int(index) < len(runs):
            out[runs[int(index)].hash] = row
    return out


def ended(job: str) -> str | None:
    """How a job that left the queue ended (sacct's state), or None without accounting."""
    if shutil.which("sacct") is None:
        return None
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True
    )
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None
