"""Multi-host cost on one machine: 2 processes x 2 CPU devices against 1 process x 4 devices.

Runs the same tiny training both ways in fresh processes, alternating, and reports the
start-up time (launch until the first step has run: process start, imports,
``jax.distributed`` rendezvous, data, compile) and the mean step time that the run itself
logs (``step_time`` in metrics.jsonl, which excludes compile, evaluation and saves).

    python scripts/bench_multihost.py [--rounds 3] [--steps 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = [
    "data.source=stdlib",
    "model.block_size=64",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.checkpoint_every=0",
    "optim.warmup_steps=2",
    "sample.num_samples=0",
]


def _run(mode: str, steps: int, workdir: Path) -> dict:
    run_dir = workdir / f"{mode}-{time.monotonic_ns()}"
    train = ["train", "nano", *OVERRIDES, f"train.steps={steps}", "--run-dir", str(run_dir)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if mode == "2x2":
        cmd = [
            sys.executable,
            "-m",
            "gptjax.cli",
            "launch",
            "--processes",
            "2",
            "--devices-per-process",
            "2",
            "--",
        ]
        cmd += train
    else:
        from gptjax.launch import with_cpu_devices

        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), 4)
        cmd = [sys.executable, "-m", "gptjax.cli", *train]
    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    startup = None
    while proc.poll() is None:
        if startup is None and metrics.exists() and metrics.stat().st_size:
            startup = time.perf_counter() - t0
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_time = [r["step_time"] for r in rows if "step_time" in r][-1]
    return {"startup_s": startup, "step_time_s": step_time, "total_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"1x4": [], "2x2": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("GPTJAX_CACHE_DIR", str(Path(tmp) / "cache"))
        for _ in range(args.rounds):
            for mode in ("1x4", "2x2"):  # alternate, so drift in machine load hits both
                results[mode].append(_run(mode, args.steps, Path(tmp)))
    summary = {
        mode: {
            key: statistics.median(r[key] for r in runs) for key in ("startup_s", "step_time_s", "total_s")
        }
        for mode, runs in results.items()
    }
    summary["ratio_2x2_over_1x4"] = {
        key: summary["2x2"][key] / summary["1x4"][key] for key in ("startup_s", "step_time_s")
    }
    print(json.dumps({"rounds": args.rounds, "steps": args.steps, "median": summary}, indent=2))
    if not args.json:
        print(f"\n{'topology':<12}{'start-up s':>12}{'step ms':>10}")
        for mode in ("1x4", "2x2"):
            s = summary[mode]
            print(f"{mode:<12}{s['startup_s']:>12.1f}{1000 * s['step_time_s']:>10.1f}")
        r = summary["ratio_2x2_over_1x4"]
        print(f"{'2x2 / 1x4':<12}{r['startup_s']:>12.2f}{r['step_time_s']:>10.2f}")


if __name__ == "__main__":
    main()
