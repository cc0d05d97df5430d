"""Data pipeline figures: tokenization throughput, batch fetch time, stdlib store size and build time.

Usage::

    TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python scripts/bench_data.py [--tokenizers bytes gpt2]

Each tokenizer builds the stdlib store from scratch in a temporary cache (the whole pipeline:
reading files, tokenizing on a thread pool, writing, hashing), then times ``TrainBatches.batch``
for 64 x 1025-token windows at random steps. Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from gptjax.config import DataConfig
from gptjax.data import TrainBatches, load_dataset, prepare


def bench(tokenizer: str, cache: str, *, batch: int, seq_len: int, fetches: int) -> dict:
    cfg = DataConfig(source="stdlib", tokenizer=tokenizer, cache_dir=cache)
    start = time.perf_counter()
    stats = prepare(cfg)
    build_s = time.perf_counter() - start
    text_mb = (stats["train_bytes"] + stats["val_bytes"]) / 1e6
    ds = load_dataset(cfg, seq_len=seq_len, vocab_size=stats["vocab_size"])
    batches = TrainBatches(ds.train, seq_len=seq_len, global_batch=batch, seed=0)
    steps = np.random.default_rng(0).integers(0, 1_000_000, fetches)
    times = []
    for step in steps:
        start = time.perf_counter()
        rows = batches.batch(int(step))
        times.append(time.perf_counter() - start)
    assert rows.shape == (batch, seq_len + 1)
    return {
        "tokenizer": tokenizer,
        "text_mb": round(text_mb, 2),
        "tokens": stats["train_tokens"] + stats["val_tokens"],
        "build_s": round(build_s, 2),
        "throughput_mb_s": round(text_mb / build_s, 2),
        "store_mb": stats["store_mb"],
        "batch_shape": [batch, seq_len + 1],
        "batch_fetch_ms_median": round(1e3 * statistics.median(times), 3),
        "batch_fetch_ms_p90": round(1e3 * sorted(times)[int(0.9 * len(times))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", nargs="+", default=["bytes", "gpt2"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--fetches", type=int, default=200)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as cache:
        for tokenizer in args.tokenizers:
            results.append(
                bench(tokenizer, cache, batch=args.batch, seq_len=args.seq_len, fetches=args.fetches)
            )
    columns = [
        "tokenizer",
        "text_mb",
        "tokens",
        "build_s",
        "throughput_mb_s",
        "store_mb",
        "batch_fetch_ms_median",
    ]
    widths = [max(len(c), *(len(str(r[c])) for r in results)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in results:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    print(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
