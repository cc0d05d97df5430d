"""Forward time of the gpt2 preset and compile time with scan_layers on and off.

    python scripts/bench_model.py                 # table, then JSON
    python scripts/bench_model.py --json-only     # JSON only

Forward: the 124M ``gpt2`` preset, jitted, at batch 1 and 8 x T tokens; the median of
``--runs`` timed calls after two warm-up calls. Compile: ``jax.jit(grad of the mean
cross-entropy).lower(...).compile()`` for gpt2-width models of 12 and 24 layers, with
``scan_layers`` on (one block compiled, run by ``lax.scan``) and off (the blocks unrolled).
Timings are wall-clock on whatever machine runs this; on a shared CPU they vary run to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import MODEL_PRESETS, ModelConfig, flops_per_token, param_counts
from gptjax.model import GPT


def forward_time(cfg: ModelConfig, batch_size: int, seq_len: int, runs: int) -> dict:
    graphdef, state = nnx.split(GPT(cfg, key=jax.random.key(0)))
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len), 0, cfg.vocab_size)
    for _ in range(2):  # compile, then one more call so that the timed calls are steady
        forward(state, tokens).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        forward(state, tokens).block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = flops_per_token(cfg, seq_len)["forward"] * batch_size * seq_len
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "runs": runs,
        "tokens_per_s": batch_size * seq_len / median,
        "gflop_per_s": flops / median / 1e9,
    }


def compile_time(cfg: ModelConfig, seq_len: int, batch_size: int) -> dict:
    abstract = nnx.eval_shape(lambda: GPT(cfg, key=jax.random.key(0)))
    graphdef, state = nnx.split(abstract)  # ShapeDtypeStructs: nothing is allocated

    def loss(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])  # (B, T, V)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(state, tokens)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {
        "n_layer": cfg.n_layer,
        "scan_layers": cfg.scan_layers,
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--compile-batch-size", type=int, default=8)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()

    gpt2 = MODEL_PRESETS["gpt2"]
    result = {
        "machine": {
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "processor": platform.processor() or platform.machine(),
            "jax": jax.__version__,
        },
        "model": {"preset": "gpt2", "params": param_counts(gpt2)["total"]},
        "forward": [forward_time(gpt2, b, args.seq_len, args.runs) for b in args.batch_sizes],
        "compile_grad": [
            compile_time(
                dataclasses.replace(gpt2, n_layer=n, scan_layers=scan), args.seq_len, args.compile_batch_size
            )
            for n in args.layers
            for scan in (True, False)
        ],
    }
    result["machine"]["load_average_1m_after"] = os.getloadavg()[0]

    if not args.json_only:
        print(
            f"gpt2 ({result['model']['params']:,} params) forward, jitted, fp32, on {jax.default_backend()}"
        )
        print(f"{'batch x T':>12}  {'median ms':>10}  {'min ms':>8}  {'tokens/s':>9}  {'GFLOP/s':>8}")
        for row in result["forward"]:
            print(
                f"{row['batch_size']:>5} x {row['seq_len']:<4}  {1e3 * row['median_s']:>10.1f}  "
                f"{1e3 * row['min_s']:>8.1f}  {row['tokens_per_s']:>9.0f}  {row['gflop_per_s']:>8.1f}"
            )
        print(f"\ncompile time of jax.grad(mean loss), gpt2 width, T={args.seq_len}")
        print(f"{'layers':>6}  {'scan_layers':>11}  {'lower s':>8}  {'compile s':>9}")
        for row in result["compile_grad"]:
            scan = str(row["scan_layers"])
            print(f"{row['n_layer']:>6}  {scan:>11}  {row['lower_s']:>8.2f}  {row['compile_s']:>9.2f}")
        print()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
