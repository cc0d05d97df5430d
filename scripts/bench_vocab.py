"""Does padding the vocabulary to a multiple of 64 speed up the train step? Measured, side by side.

    python scripts/bench_vocab.py                      # gpt2 shape (124M, 4 x 256), 5 rounds
    python scripts/bench_vocab.py --shape smoke --vocabs 257 320 --rounds 1 --steps 1  # the test

nanoGPT pads GPT-2's 50,257 tokens to 50,304 (a multiple of 64 and of 128) and reports a
faster step on GPUs. This script measures the same choice for gptjax on the machine it runs
on: ``gptjax.train.build(config).train_step`` (the loop's own jitted step: loss, gradients,
clipping, AdamW) compiled once per vocabulary size, then timed in alternating rounds (A, B,
A, B, ...) in one process so that a noisy neighbour slows both alike. Each round times
``--steps`` steps after one untimed step; a vocabulary's figure is the median over rounds
of its rounds' median step time. The batch is the same random tokens below the smallest size for
every size (padded rows are never targets, as in nanoGPT).

Prints one JSON object, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import SHAPES, make_batch, make_config  # noqa: E402


def compiled_step(shape: str, vocab: int, batch_vocab: int):
    from gptjax import sharding
    from gptjax.train import build

    config = make_config(shape, overrides=(f"model.vocab_size={vocab}",))
    setup = build(config)
    state = setup.init()
    tokens = make_batch(make_config(shape, overrides=(f"model.vocab_size={batch_vocab}",)))
    batch = sharding.global_batch(tokens, setup.mesh)
    start = time.perf_counter()
    step = setup.train_step.lower(state, batch).compile()
    return step, state, batch, time.perf_counter() - start


def timed(step, state, batch, steps: int):
    state, metrics = step(state, batch)  # untimed: the first call after a switch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - start)
    return state, statistics.median(times), float(metrics["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", choices=list(SHAPES))
    parser.add_argument("--vocabs", type=int, nargs="+", default=[50257, 50304])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import jax

    runs = {}
    for vocab in args.vocabs:
        step, state, batch, compile_s = compiled_step(args.shape, vocab, min(args.vocabs))
        runs[vocab] = {"step": step, "state": state, "batch": batch, "compile_s": compile_s, "times": []}
    loss = {}
    for _ in range(args.rounds):
        for vocab, run in runs.items():
            run["state"], seconds, loss[vocab] = timed(run["step"], run["state"], run["batch"], args.steps)
            run["times"].append(seconds)
    base = args.vocabs[0]
    base_s = statistics.median(runs[base]["times"])
    rows = []
    for vocab, run in runs.items():
        median = statistics.median(run["times"])
        rows.append(
            {
                "vocab_size": vocab,
                "step_s_median": round(median, 4),
                "step_s_rounds": [round(t, 4) for t in run["times"]],
                "speedup_vs_first": round(base_s / median, 3),
                "compile_s": round(run["compile_s"], 2),
                "last_loss": round(loss[vocab], 4),
            }
        )
    batch, seq = SHAPES[args.shape]
    print(
        json.dumps(
            {
                "shape": args.shape,
                "batch": batch,
                "seq_len": seq,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "backend": jax.default_backend(),
                "devices": str(jax.devices()[0].device_kind),
                "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(),
                "jax": jax.__version__,
                "python": platform.python_version(),
                "results": rows,
            }
        )
    )
    print(f"\n{'vocab':>7} {'step s (median)':>16} {'vs ' + str(base):>10} {'compile s':>10}")
    for row in rows:
        print(
            f"{row['vocab_size']:>7} {row['step_s_median']:>16.4f} "
            f"{row['speedup_vs_first']:>10.3f} {row['compile_s']:>10.2f}"
        )


if __name__ == "__main__":
    main()
