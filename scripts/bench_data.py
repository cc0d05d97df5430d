"""Data pipeline figures side by side: store build vs tiktoken x cores, peak memory, batch fetch.

Usage::

    TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python scripts/bench_data.py [--corpus-mb 500]

1. Generates a Parquet corpus of ``--corpus-mb`` MB of text (documents of 1-8 KB cut at
   random from the offline texts in ``../shared``; a vocabulary-rich mix, reshuffled so
   repeats are not byte-identical runs).
2. Baseline: single-thread tiktoken ``encode_ordinary_batch`` (through
   ``Tokenizer.encode_batch(num_threads=1)``) on the first ``--sample-mb`` MB of the same text.
3. Builds the gpt2 store from the corpus, once per pool kind (``process``, ``thread``), each
   in a fresh child process with one worker per core, reporting MB/s of text, the ratio to
   ``cores x baseline``, and the peak RSS of the builder and the peak PSS summed over it and its workers.
4. Probes the GIL: does a Python thread keep running while tiktoken encodes?
5. Copies the train split into a single-file store and a multi-shard store (same writer)
   and times ``TrainBatches.batch`` at 64 x 1025 tokens on both.

Prints a table, then one JSON object (with the load average, since the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gptjax.config import DataConfig
from gptjax.data import TrainBatches, load_dataset, store
from gptjax.tokenizer import get_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

_CHILD = """
import json, os, resource, sys, threading, time
from gptjax.config import DataConfig
from gptjax.data import prepare

cpu = {}  # pid -> user + system seconds, last seen (workers' are gone once the build ends)
TICK = os.sysconf("SC_CLK_TCK")

def tree_pss():  # Proportional set size of this process and its descendants (workers, forkserver).
    total, pids, seen = 0, [os.getpid()], set()
    while pids:
        pid = pids.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cpu[pid] = (int(fields[11]) + int(fields[12])) / TICK
            for task in os.listdir(f"/proc/{pid}/task"):
                pids += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return total

peak, done = [0], threading.Event()
def sample():
    while not done.wait(0.25):
        peak[0] = max(peak[0], tree_pss())
threading.Thread(target=sample, daemon=True).start()
cfg = DataConfig(source=sys.argv[1], tokenizer="gpt2", cache_dir=sys.argv[2], val_fraction=0.001)
tree_pss()
cpu_before = sum(cpu.values())  # Python and gptjax imports are not the build's cost.
start = time.perf_counter()
stats = prepare(cfg, workers=int(sys.argv[3]), pool=sys.argv[4])
seconds = time.perf_counter() - start
done.set()
tree_pss()
print(json.dumps({"seconds": seconds, "stats": {k: stats[k] for k in ("store", "tokens", "bytes", "shards")},
                  "rss_builder_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "pss_tree_mib": peak[0] / 2**20, "cpu_s": sum(cpu.values()) - cpu_before}))
"""


def _source_text() -> str:
    files = sorted((SHARED / "data").glob("*.txt")) + sorted((SHARED / "background").glob("*.txt"))
    if not files:
        raise SystemExit(f"no texts under {SHARED}: the benchmark needs the offline corpus")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Writes the Parquet corpus in row groups of 1,024 documents; returns its text bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = _source_text()
    words = text.split(" ")
    rng = np.random.default_rng(seed)
    target, written = int(megabytes * 1e6), 0
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="zstd") as writer:
        while written < target:
            docs = []
            for _ in range(1024):
                n = int(rng.integers(150, 1200))  # About 1-8 KB of words.
                start = int(rng.integers(0, len(words) - n))
                piece = words[start : start + n]
                if rng.random() < 0.5:  # Reorder sentences' words a little: no exact repeats.
                    cut = int(rng.integers(1, n))
                    piece = piece[cut:] + piece[:cut]
                docs.append(" ".join(piece))
            written += sum(len(d.encode()) for d in docs)
            writer.write_table(pa.table({"text": docs}))
    return written


cpu_mb_s = [0.0]  # The baseline's MB per CPU second (the machine may be shared: see main).


def baseline_mb_s(path: Path, sample_mb: float) -> tuple[float, float]:
    """Single-thread tiktoken gpt2 on the corpus's first sample_mb MB, in MB/s.

    Returns ``encode_ordinary_batch`` (the goal's baseline) and ``encode_array`` (the
    build's per-document call: tiktoken's ``encode_to_numpy``, no Python list).
    """
    import pyarrow.parquet as pq

    docs, size = [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for text in batch.column(0).to_pylist():
            docs.append(text)
            size += len(text.encode())
        if size >= sample_mb * 1e6:
            break
    tokenizer = get_tokenizer("gpt2")
    tokenizer.encode_batch(docs[:50], num_threads=1)  # Warm.
    start, cpu_start = time.perf_counter(), time.process_time()
    for begin in range(0, len(docs), 256):
        tokenizer.encode_batch(docs[begin : begin + 256], num_threads=1)
    batch_s = time.perf_counter() - start
    cpu_mb_s[0] = size / 1e6 / (time.process_time() - cpu_start)
    start = time.perf_counter()
    for doc in docs:
        tokenizer.encode_array(doc)
    return size / 1e6 / batch_s, size / 1e6 / (time.perf_counter() - start)


def gil_probe(path: Path) -> dict[str, float]:
    """Does tiktoken release the GIL? A spinning Python thread's loop rate while the main thread
    encodes one long text, against its rate while the main thread sleeps (GIL free) and while
    it runs Python (GIL held). Rates, not times: robust to a loaded machine.
    """
    import threading

    import pyarrow.parquet as pq

    text = "\n".join(next(pq.ParquetFile(path).iter_batches(batch_size=2000)).column(0).to_pylist())
    tokenizer = get_tokenizer("gpt2")
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    rates = {}
    for name, work in [
        ("encode", lambda: tokenizer.encode_array(text)),
        ("gil_free", lambda: time.sleep(1.0)),
        ("gil_held", lambda: sum(range(20_000_000))),
    ]:
        before, start = count[0], time.perf_counter()
        work()
        rates[name] = (count[0] - before) / (time.perf_counter() - start)
    stop.set()
    thread.join()
    return {
        "spinner_rate_while_encoding_vs_free": round(rates["encode"] / rates["gil_free"], 3),
        "spinner_rate_while_python_vs_free": round(rates["gil_held"] / rates["gil_free"], 3),
    }


def build(path: Path, cache: Path, pool: str, workers: int) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(cache), str(workers), pool],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if run.returncode:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def fetch_ms(tokens, *, batch: int, seq_len: int, fetches: int) -> tuple[float, float]:
    batches = TrainBatches(tokens, seq_len=seq_len, global_batch=batch, seed=0)
    first = int(np.random.default_rng(0).integers(0, 100_000))
    steps = first + np.arange(fetches)  # Consecutive steps, as training reads them.
    for step in range(first - 10, first):
        batches.batch(step)  # Warm the epoch permutation.
    times = []
    for step in steps:
        start = time.perf_counter()
        rows = batches.batch(int(step))
        times.append(time.perf_counter() - start)
    assert rows.shape == (batch, seq_len + 1)
    return round(1e3 * statistics.median(times), 3), round(1e3 * sorted(times)[int(0.9 * len(times))], 3)


def copy_store(tokens, folder: Path, shard_tokens: int) -> store.ShardedTokens:
    folder.mkdir()
    writer = store.ShardWriter(folder, "train", tokens.dtype, shard_tokens, 1 << 16, "copy")
    for begin in range(0, len(tokens), 1 << 24):
        writer.write(np.asarray(tokens[begin : begin + (1 << 24)]))
    writer.close()
    lengths = writer.shard_lengths()
    return store.ShardedTokens(
        [store.shard_path(folder, "train", i) for i in range(len(lengths))], lengths, tokens.dtype
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=500)
    parser.add_argument("--sample-mb", type=float, default=20)
    parser.add_argument("--pools", nargs="+", default=["process", "thread"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--fetches", type=int, default=200)
    parser.add_argument("--shards", type=int, default=8, help="shards of the multi-shard copy")
    parser.add_argument("--tmp", default=None, help="folder for the corpus and stores (default: $TMPDIR)")
    args = parser.parse_args()
    result: dict = {
        "cpu_count": os.cpu_count(),
        "workers": args.workers,
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        start = time.perf_counter()
        result["corpus_text_mb"] = round(make_corpus(corpus, args.corpus_mb) / 1e6, 1)
        result["corpus_file_mb"] = round(corpus.stat().st_size / 1e6, 1)
        result["corpus_seconds"] = round(time.perf_counter() - start, 1)
        single, single_array = baseline_mb_s(corpus, args.sample_mb)
        result["tiktoken_single_thread_mb_s"] = round(single, 3)
        result["encode_array_single_thread_mb_s"] = round(single_array, 3)
        result["tiktoken_single_thread_mb_per_cpu_s"] = round(cpu_mb_s[0], 3)
        result["gil"] = gil_probe(corpus)
        builds = []
        for pool in args.pools:
            child = build(corpus, Path(tmp) / f"cache-{pool}", pool, args.workers)
            mb_s = child["stats"]["bytes"]["train"] / 1e6 / child["seconds"]
            mb_s += child["stats"]["bytes"]["val"] / 1e6 / child["seconds"]
            builds.append(
                {
                    "pool": pool,
                    "build_s": round(child["seconds"], 1),
                    "mb_s": round(mb_s, 3),
                    "vs_cores_x_single": round(mb_s / (args.workers * single), 3),
                    "vs_cores_x_encode_array": round(mb_s / (args.workers * single_array), 3),
                    "cpu_s": round(child["cpu_s"], 1),
                    # MB per CPU second against the baseline's: the work overhead, whatever the load.
                    "cpu_efficiency": round(mb_s * child["seconds"] / child["cpu_s"] / cpu_mb_s[0], 3),
                    "rss_builder_mib": round(child["rss_builder_mib"]),
                    "pss_all_processes_mib": round(child["pss_tree_mib"]),
                    "store": child["stats"]["store"],
                }
            )
        result["builds"] = builds
        ds = load_dataset(
            DataConfig(
                source=str(corpus),
                tokenizer="gpt2",
                cache_dir=str(Path(tmp) / f"cache-{args.pools[0]}"),
                val_fraction=0.001,
            ),
            seq_len=args.seq_len,
            vocab_size=50304,
        )
        n = len(ds.train)
        one = copy_store(ds.train, Path(tmp) / "one", n)
        many = copy_store(ds.train, Path(tmp) / "many", -(-n // args.shards))
        kw = {"batch": args.batch, "seq_len": args.seq_len, "fetches": args.fetches}
        flat = np.memmap(one.paths[0], one.dtype, "r")  # Format 1: a flat memmap, fancy-indexed.
        result["fetch"] = {
            "tokens": n,
            "flat_memmap_ms": fetch_ms(flat, **kw),
            "single_file_ms": fetch_ms(one, **kw),
            f"{len(many.paths)}_shards_ms": fetch_ms(many, **kw),
        }
        result["fetch"]["ratio_median"] = round(
            result["fetch"][f"{len(many.paths)}_shards_ms"][0] / result["fetch"]["single_file_ms"][0], 3
        )
    result["load_average_end"] = os.getloadavg()
    result["bench_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(
        f"corpus: {result['corpus_text_mb']} MB text ({result['corpus_file_mb']} MB Parquet), "
        f"tiktoken gpt2 single thread: encode_ordinary_batch {single:.2f} MB/s, "
        f"encode_to_numpy {single_array:.2f} MB/s; {args.workers} workers"
    )
    print(
        f"{'pool':8} {'build_s':>8} {'MB/s':>8} {'/ (cores x batch)':>18} {'/ (cores x numpy)':>18} "
        f"{'CPU eff.':>9} {'RSS builder':>12} {'PSS all':>9}"
    )
    for b in builds:
        print(
            f"{b['pool']:8} {b['build_s']:>8} {b['mb_s']:>8} {b['vs_cores_x_single']:>18} "
            f"{b['vs_cores_x_encode_array']:>18} {b['cpu_efficiency']:>9} "
            f"{b['rss_builder_mib']:>10}Mi {b['pss_all_processes_mib']:>7}Mi"
        )
    gil = result["gil"]
    print(
        f"GIL: a Python thread runs at {gil['spinner_rate_while_encoding_vs_free']:.0%} of its free rate "
        f"while tiktoken encodes ({gil['spinner_rate_while_python_vs_free']:.0%} while Python code runs)"
    )
    fetch = result["fetch"]
    print(
        f"batch {args.batch} x {args.seq_len + 1} (median): flat memmap {fetch['flat_memmap_ms'][0]} ms, "
        f"single file {fetch['single_file_ms'][0]} ms, "
        f"{len(many.paths)} shards {fetch[f'{len(many.paths)}_shards_ms'][0]} ms "
        f"(ratio {fetch['ratio_median']})"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
