"""Training throughput of gptjax against a PyTorch GPT-2 of the same shape, side by side.

    python scripts/bench_train.py                          # quickstart and gpt2 shapes, 5 rounds
    python scripts/bench_train.py --shapes gpt2 --rounds 3 # one shape
    python scripts/bench_train.py --smoke                  # tiny model, 2 steps, 1 round (tests)

Shapes (float32, random tokens, one fixed batch reused every step):

- ``quickstart``: :func:`gptjax.config.quickstart` (byte vocab, 4 x 128, 4 heads), 16 x 128.
- ``gpt2``: the 124M ``gpt2`` preset at T=256, batch 4 (a batch a 2-core CPU steps in
  seconds; ``--batch`` changes it for both implementations).
- ``smoke``: the ``nano`` preset, 4 x 64.

Both sides run the whole update: loss, gradients, clipping to global norm 1.0, AdamW
(betas 0.9/0.95, eps 1e-8, weight decay 0.1 on weight matrices only; constant learning
rate). Ours is ``gptjax.train.build(config).train_step``, the loop's own jitted step;
theirs is :mod:`benchmarks.torch_gpt` with ``torch.set_num_threads(os.cpu_count())``.
XLA keeps its default threading. ``--cpu-devices N`` runs ours over N CPU devices of one
process (data parallel, the batch split between them; they share the cores).

Before timing, a parity process copies our initial parameters into the torch model and
checks that the two losses agree at step 0 (same weights) and at step 1 (same update),
and that the step-0 loss is about ln(V).

Each timed run is a separate process; runs alternate (ours, torch, torch, ours, ...)
``--rounds`` times, so a noisy neighbour on a shared machine hurts both alike. A run
times ``--steps`` steps after ``--warmup`` steps (each step waited for) and reports its
median step time; the summary is the median over rounds, and ``speedup`` is the ratio
of the two medians (torch's step time / ours). MFU divides the achieved FLOP/s,
``flops_per_token`` (:func:`gptjax.config.flops_per_token`: 6 N + 6 L T D, the causal
attention term halved) times tokens per second, by the peak: the table's figure on an
accelerator, on CPU the median over our runs of :func:`gptjax.metrics.measured_cpu_peak`.

Prints one JSON line per run, then a JSON summary and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"quickstart": (16, 128), "gpt2": (4, 256), "smoke": (4, 64)}  # (batch, seq_len)


def make_config(shape: str, batch: int | None = None, overrides: tuple[str, ...] = ()):
    """The gptjax Config of a benchmark shape (constant LR so torch can match it exactly)."""
    from gptjax.config import (
        MODEL_PRESETS,
        Config,
        DataConfig,
        OptimConfig,
        TrainConfig,
        apply_overrides,
        quickstart,
    )

    default_batch, seq = SHAPES[shape]
    if shape == "quickstart":
        model = quickstart().model
    elif shape == "gpt2":
        model = dataclasses.replace(MODEL_PRESETS["gpt2"], block_size=seq)
    else:
        model = MODEL_PRESETS["nano"]
    config = Config(
        name=f"bench-{shape}",
        model=dataclasses.replace(model, block_size=seq),
        data=DataConfig(tokenizer="bytes"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-3, schedule="constant", warmup_steps=0),
        train=TrainConfig(steps=1000, batch_size=batch or default_batch),
    )
    return apply_overrides(config, overrides)


def make_batch(config):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (config.train.batch_size, config.model.block_size + 1)
    return rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)


# --------------------------------------------------------------------------------------
# Workers (one per process)


def _jax_step(config):
    """Build, initialise and AOT-compile our train step; returns (compiled, state, batch, seconds)."""
    from gptjax import sharding
    from gptjax.train import build

    setup = build(config)
    state = setup.init()
    batch = sharding.global_batch(make_batch(config), setup.mesh)
    start = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    return compiled, state, batch, time.perf_counter() - start


def worker_jax(config, warmup: int, steps: int) -> dict:
    try:
        from gptjax.host import keep_freed_memory
    except ImportError:  # a --baseline checkout from before gptjax.host
        kept = False
    else:
        kept = keep_freed_memory()  # as `gptjax train` does, before JAX starts its backend
    import jax

    from gptjax.metrics import peak_flops

    compiled, state, batch, compile_s = _jax_step(config)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak, source = peak_flops(config.model.dtype, config.train.peak_flops)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {
        "step_times": times,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "peak_flops": peak,
        "peak_source": source,
        "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "peak_device_memory": stats.get("peak_bytes_in_use"),
        "host_memory_kept": kept,
    }


def _torch_setup(config, threads: int):
    import torch

    from benchmarks.torch_gpt import GPT, make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT.from_config(config.model)
    o = config.optim
    optimizer = make_optimizer(
        model, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    batch = torch.from_numpy(make_batch(config)).long()
    return model, optimizer, batch


def worker_torch(config, warmup: int, steps: int, threads: int) -> dict:
    import torch

    from benchmarks.torch_gpt import train_step

    model, optimizer, batch = _torch_setup(config, threads)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch, config.optim.grad_clip)  # .item() waits
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_times": times, "loss": loss, "threads": torch.get_num_threads(), "torch": torch.__version__}


def worker_parity(config, threads: int) -> dict:
    """Our first two losses and torch's on the same weights and batch."""
    import jax
    from flax import nnx

    from benchmarks.torch_gpt import load_hf_state_dict, train_step
    from gptjax.interop import hf_state_dict

    compiled, state, batch, _ = _jax_step(config)
    params = jax.device_get(nnx.to_pure_dict(state.params))  # host copies: the step donates state
    ours = []
    for _ in range(2):
        state, metrics = compiled(state, batch)
        ours.append(float(metrics["loss"]))
    model, optimizer, torch_batch = _torch_setup(config, threads)
    load_hf_state_dict(model, hf_state_dict(params, config.model))
    theirs = [train_step(model, optimizer, torch_batch, config.optim.grad_clip) for _ in range(2)]
    return {
        "ours": ours,
        "torch": theirs,
        "ln_vocab": math.log(config.model.vocab_size),
        "max_abs_diff": max(abs(a - b) for a, b in zip(ours, theirs, strict=True)),
    }


# --------------------------------------------------------------------------------------
# Driver


def run_worker(kind: str, args, shape: str, pythonpath: str | None = None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--shapes",
        shape,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    for item in args.override:
        cmd += ["--override", item]
    env = dict(os.environ)
    if kind == "jax" and args.cpu_devices:
        from gptjax.launch import with_cpu_devices

        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), args.cpu_devices)
    if pythonpath:
        env["GPTJAX_BENCH_BASELINE"] = "1"
    paths = [p for p in (pythonpath, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} worker failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(shape: str, config, runs: dict[str, list[dict]], parity: dict | None) -> dict:
    from gptjax.config import flops_per_token, param_counts

    b, t = config.train.batch_size, config.model.block_size
    flops = flops_per_token(config.model, t)
    ours_runs = runs["jax"]
    peak = statistics.median(r["peak_flops"] for r in ours_runs) * ours_runs[0]["n_devices"]
    row = {
        "shape": shape,
        "batch_size": b,
        "seq_len": t,
        "params": param_counts(config.model)["total"],
        "flops_per_token": flops["total"],
        "flops_formula": "6 * N_matmul + 6 * n_layer * T * n_embd (causal attention, fwd+bwd)",
        "peak_flops": peak,
        "peak_source": ours_runs[0]["peak_source"],
        "rounds": len(ours_runs),
        "parity": parity,
    }
    for name, rs in runs.items():
        step = statistics.median(statistics.median(r["step_times"]) for r in rs)
        row[name] = {
            "step_time_s": step,
            "step_time_per_round": [statistics.median(r["step_times"]) for r in rs],
            "tokens_per_sec": b * t / step,
            "mfu": flops["total"] * b * t / step / peak if peak else None,
            "max_rss_bytes": statistics.median(r["max_rss_bytes"] for r in rs),
        }
        if name.startswith("jax"):
            row[name]["n_devices"] = rs[0]["n_devices"]
            row[name]["compile_s"] = statistics.median(r["compile_s"] for r in rs)
            row[name]["peak_device_memory"] = rs[0]["peak_device_memory"]
    for name in runs:
        if name != "jax":
            row[f"speedup_vs_{name}"] = row[name]["step_time_s"] / row["jax"]["step_time_s"]
    return row


def print_table(rows: list[dict], command: str) -> None:
    print(f"\n$ {command}")
    head = f"{'shape':<11} {'B x T':>9} {'impl':<13} {'step s':>8} {'tok/s':>9} {'MFU':>6} {'compile s':>9}"
    print(head + f" {'max RSS MiB':>11} {'ours/impl':>9}")
    for row in rows:
        for name in (k for k in row if isinstance(row[k], dict) and "step_time_s" in row[k]):
            r = row[name]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            ratio = f"{row[f'speedup_vs_{name}']:.2f}x" if f"speedup_vs_{name}" in row else ""
            print(
                f"{row['shape']:<11} {row['batch_size']:>4} x {row['seq_len']:<3} {name:<13} "
                f"{r['step_time_s']:>8.3f} {r['tokens_per_sec']:>9.0f} {mfu:>6} {comp:>9} "
                f"{r['max_rss_bytes'] / 2**20:>11.0f} {ratio:>9}"
            )
    peak = rows[0]["peak_flops"] if rows else 0
    for row in rows:
        if row["jax"]["n_devices"] > 1:
            print(f"{row['shape']}: ours data-parallel over {row['jax']['n_devices']} devices")
    print(
        f"MFU against {peak / 1e9:.1f} GFLOP/s ({rows[0]['peak_source'] if rows else ''}); "
        "ours/impl = impl's median step time / ours"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["quickstart", "gpt2"], choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=0, help="batch size for every shape (0: the shape's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--override", action="append", default=[], help="section.field=value for ours")
    parser.add_argument("--baseline", default="", help="a gptjax checkout to time as 'jax-baseline'")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="ours on this many CPU devices (data parallel; 0: JAX's default)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the torch runs")
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, 1 round")
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--worker", choices=["jax", "torch", "parity"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if os.environ.get("GPTJAX_BENCH_BASELINE"):
            # Only the baseline checkout's own modules: without this, an editable install of
            # this tree would supply any module the older checkout lacks.
            editable = lambda finder: getattr(finder, "__module__", "").startswith("__editable__")
            sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
        sys.path.append(str(ROOT))  # benchmarks/, after any --baseline checkout on PYTHONPATH
        config = make_config(args.shapes[0], args.batch or None, tuple(args.override))
        if args.worker == "jax":
            result = worker_jax(config, args.warmup, args.steps)
        elif args.worker == "torch":
            result = worker_torch(config, args.warmup, args.steps, args.threads)
        else:
            result = worker_parity(config, args.threads)
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return
    if args.smoke:
        args.shapes, args.rounds, args.warmup, args.steps = ["smoke"], 1, 1, 2

    import jax

    command = "python scripts/bench_train.py " + " ".join(sys.argv[1:])
    kinds = ["jax"] + ([] if args.no_torch else ["torch"]) + (["jax-baseline"] if args.baseline else [])
    rows = []
    for shape in args.shapes:
        config = make_config(shape, args.batch or None, tuple(args.override))
        parity = None
        if not (args.no_parity or args.no_torch):
            parity = run_worker("parity", args, shape)
            print(json.dumps({"shape": shape, "parity": parity}), flush=True)
            if parity["max_abs_diff"] > 1e-3 * parity["ln_vocab"]:
                raise SystemExit(f"{shape}: losses differ, not the same computation: {parity}")
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for i in range(args.rounds):
            order = kinds if i % 2 == 0 else kinds[::-1]
            for kind in order:
                worker = "jax" if kind.startswith("jax") else "torch"
                result = run_worker(worker, args, shape, args.baseline if kind == "jax-baseline" else None)
                runs[kind].append(result)
                print(json.dumps({"shape": shape, "round": i, "impl": kind, **result}), flush=True)
        rows.append(summarize(shape, config, runs, parity))
    summary = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "results": rows,
    }
    print(json.dumps(summary, indent=None if args.json_only else 2))
    if not args.json_only:
        print_table(rows, command)


if __name__ == "__main__":
    main()
