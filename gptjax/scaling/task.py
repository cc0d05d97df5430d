"""Train one run of a sweep: what a local worker or a SLURM array task executes.

``python -m gptjax.scaling.task SWEEP_DIR HASH`` claims the run's directory
(:mod:`gptjax.scaling.claims`), trains it (resuming from its newest checkpoint), and
records a failure in ``error.txt`` and the time spent in ``timing.json``. Exit codes:
0 finished, or left alone (finished already, or claimed by a live owner); 75 stopped by
SIGTERM/SIGINT after saving (the caller may requeue); 1 failed. ``--claim-only`` claims
and exits (0 claimed, 3 left alone); ``--no-claim`` trains without claiming: a SLURM task
with several processes claims once in its batch step, then every process trains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from gptjax.scaling import claims
from gptjax.scaling.sweep import Run, read

EX_INTERRUPTED = 75  # EX_TEMPFAIL: try again later
EX_LEFT_ALONE = 3


def finished(run: Run) -> bool:
    result = Path(run.config.train.run_dir) / "result.json"
    try:
        return json.loads(result.read_text()).get("step") == run.config.train.steps
    except (OSError, json.JSONDecodeError):
        return False


def train_run(run: Run, *, mesh=None, claim: bool = True) -> str:
    """Claim and train one run: "finished", "interrupted", "failed" or "skipped" (finished
    already, or another live owner holds it)."""
    from gptjax.train import train

    run_dir = Path(run.config.train.run_dir)
    if finished(run):
        return "skipped"
    held = claims.claim(run_dir) if claim else None
    if claim and held is None:
        print(f"gptjax sweep: run {run.hash} is claimed by a live job; left alone", flush=True)
        return "skipped"
    claims.clear_partial(run_dir)
    t0, status = time.perf_counter(), "failed"
    try:
        result = train(run.config, mesh=mesh)
        status = "interrupted" if result.interrupted else "finished"
    except Exception:  # recorded and reported in the table; the other runs go on
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        print(f"gptjax sweep: run {run.hash} failed, see {run_dir / 'error.txt'}", flush=True)
    if _is_main():
        timing = run_dir / "timing.json"
        spent = json.loads(timing.read_text())["wall_time_s"] if timing.exists() else 0.0
        timing.write_text(json.dumps({"wall_time_s": spent + time.perf_counter() - t0}))
    if held is not None and "job" not in held:
        claims.release(run_dir, held)
    return status


def _is_main() -> bool:
    import jax

    try:
        return jax.process_index() == 0
    except RuntimeError:  # no backend could start: the failure is already recorded
        return True


def find(sweep_dir: str | Path, run_hash: str) -> Run:
    from gptjax.errors import GptjaxError

    _, runs = read(sweep_dir)
    for run in runs:
        if run.hash == run_hash:
            return run
    raise GptjaxError(f"sweep {str(sweep_dir)!r} has no run {run_hash!r}: give a hash from its runs/")


def main(argv: list[str] | None = None) -> int:
    from gptjax.errors import GptjaxError
    from gptjax.host import keep_freed_memory

    parser = argparse.ArgumentParser(prog="python -m gptjax.scaling.task", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("hash")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--claim-only", action="store_true")
    mode.add_argument("--no-claim", action="store_true")
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        run = find(args.sweep_dir, args.hash)
        if args.claim_only:
            if finished(run) or claims.claim(run.config.train.run_dir) is None:
                return EX_LEFT_ALONE
            return 0
        status = train_run(run, claim=not args.no_claim)
    except GptjaxError as e:
        print(f"gptjax sweep: run {args.hash}: error: {e}", file=sys.stderr)
        return 1
    return {"failed": 1, "interrupted": EX_INTERRUPTED}.get(status, 0)


if __name__ == "__main__":
    sys.exit(main())
