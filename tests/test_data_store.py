"""The sharded store: shard layout, lazy memory maps, parallel builds, kill-and-resume, > 4 GiB."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from gptjax.config import DataConfig
from gptjax.data import TrainBatches, build, eval_batches, load_dataset, prepare, store
from gptjax.errors import GptjaxError


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _parquet_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(seed)
    words = np.array(["the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "with", "as"])
    texts = [" ".join(rng.choice(words, rng.integers(5, 400))) + "." for _ in range(n_docs)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=64)
    return path


def _store_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a store, with the build's timing and resumption facts taken out of meta.json."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    meta = json.loads(files.pop("meta.json"))
    for key in ("build_seconds", "resumed_from_document"):
        meta.pop(key)
    return {**files, "meta.json": json.dumps(meta, sort_keys=True).encode()}


def test_shards_hold_a_fixed_number_of_tokens_and_are_mapped_when_touched(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_TOKENS", 1000)
    corpus = _parquet_corpus(tmp_path / "c.parquet", 60)
    stats = prepare(DataConfig(source=str(corpus), val_fraction=0.1))
    shards = stats["shards"]
    assert stats["format"] == 2 and stats["dtype"] == "uint16" and len(shards["train"]) > 5
    assert all(n == 1000 for n in shards["train"][:-1]) and 0 < shards["train"][-1] <= 1000
    assert sum(shards["train"]) == stats["train_tokens"]
    names = sorted(p.name for p in Path(stats["store"]).iterdir())
    assert names == sorted(
        ["meta.json"] + [f"{s}-{i:05d}.bin" for s in ("train", "val") for i in range(len(shards[s]))]
    )
    ds = load_dataset(DataConfig(source=str(corpus), val_fraction=0.1), seq_len=16, vocab_size=257)
    assert ds.train.maps == {}  # Opening maps nothing.
    assert ds.train[2500] == ds.train[2000:3000][500] and set(ds.train.maps) == {2}
    whole = np.concatenate([np.fromfile(p, np.uint16) for p in ds.train.paths])
    starts = np.array([0, 990, 1995, len(whole) - 17, 3000])  # 990 and 1995 cross a boundary.
    assert np.array_equal(ds.train.windows(starts, 17), whole[starts[:, None] + np.arange(17)])
    index = np.random.default_rng(0).integers(0, len(whole), (7, 5))
    assert np.array_equal(ds.train[index], whole[index])
    assert np.array_equal(ds.train[-3:], whole[-3:]) and np.array_equal(np.asarray(ds.train), whole)
    batches = TrainBatches(ds.train, seq_len=16, global_batch=8, seed=1)
    flat = TrainBatches(whole, seq_len=16, global_batch=8, seed=1)
    assert all(np.array_equal(batches.batch(s), flat.batch(s)) for s in (0, 5, 99))


def test_large_vocabularies_get_uint32_and_ids_are_checked(tmp_path: Path):
    folder = tmp_path / "s"
    folder.mkdir()
    writer = store.ShardWriter(folder, "train", store.token_dtype(100_000), 10, 100_000, "big")
    writer.write(np.array([0, 70_000, 99_999] * 5))
    assert writer.dtype == np.uint32 and writer.shard_lengths() == [10, 5]
    with pytest.raises(GptjaxError, match=r"token id 100000 is outside the vocabulary \[0, 100000\)"):
        writer.write(np.array([1, 100_000]))
    with pytest.raises(GptjaxError, match=r"token id -1 is outside"):
        writer.write(np.array([-1, 3]))
    writer.close()
    tokens = store.ShardedTokens([store.shard_path(folder, "train", i) for i in (0, 1)], [10, 5], np.uint32)
    assert tokens[[1, 10, 13, 14]].tolist() == [70_000, 70_000, 70_000, 99_999]


def test_process_and_thread_pools_write_the_same_store(tmp_path, gpt2_tokenizer_available, monkeypatch):
    monkeypatch.setattr(build, "CHUNK_CHARS", 20_000)
    corpus = str(_parquet_corpus(tmp_path / "c.parquet", 300))
    folders = []
    for index, (workers, pool) in enumerate([(1, "thread"), (2, "thread"), (2, "process")]):
        cfg = DataConfig(source=corpus, tokenizer="gpt2", cache_dir=str(tmp_path / f"cache{index}"))
        stats = prepare(cfg, workers=workers, pool=pool)
        folders.append(Path(stats["store"]))
    assert stats["dtype"] == "uint16" and stats["val_documents"] == 1  # 300 * 0.005
    reference = _store_bytes(folders[0])
    assert all(_store_bytes(f) == reference for f in folders[1:])


_BUILD = """
import sys
from gptjax.config import DataConfig
from gptjax.data import build, prepare, store
store.SHARD_TOKENS, build.CHUNK_CHARS = 20_000, 4_000
prepare(DataConfig(source=sys.argv[1], val_fraction=0.05), workers=2, pool="thread")
"""


@pytest.mark.slow  # About 15 s: three builder processes, each importing JAX.
def test_killed_builds_resume_to_the_uninterrupted_store_byte_for_byte(
    tmp_path: Path, cache: Path, monkeypatch
):
    # Large enough that an idle machine does not finish it inside the random delay below.
    corpus = str(_parquet_corpus(tmp_path / "c.parquet", 6000))
    env = {**os.environ, "GPTJAX_CACHE_DIR": str(cache)}
    rng = np.random.default_rng(22)
    positions = [0]

    def position() -> int:
        records = list(cache.glob(".partial-*/progress.json"))
        return json.loads(records[0].read_text())["position"] if records else 0

    for _ in range(2):
        process = subprocess.Popen([sys.executable, "-c", _BUILD, corpus], env=env)
        deadline = time.monotonic() + 60
        while position() == positions[-1] and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # Until this attempt has written something of its own...
        time.sleep(rng.uniform(0.0, 0.05))  # ...then at a random moment.
        process.send_signal(signal.SIGKILL)
        process.wait()
        positions.append(position())
        assert not [p for p in cache.iterdir() if not p.name.startswith(".partial-")]  # Nothing published.
    assert 0 < positions[1] < positions[2], positions  # Each kill landed mid-build.
    finish = subprocess.run([sys.executable, "-c", _BUILD, corpus], env=env, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    [resumed] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert json.loads((resumed / "meta.json").read_text())["resumed_from_document"] == positions[-1]

    monkeypatch.setattr(store, "SHARD_TOKENS", 20_000)
    monkeypatch.setattr(build, "CHUNK_CHARS", 4_000)
    cfg = DataConfig(source=corpus, val_fraction=0.05, cache_dir=str(tmp_path / "fresh"))
    uninterrupted = Path(prepare(cfg, workers=2, pool="thread")["store"])
    assert resumed.name == uninterrupted.name
    assert _store_bytes(resumed) == _store_bytes(uninterrupted)
    assert len(json.loads((resumed / "meta.json").read_text())["shards"]["train"]) > 10


def test_the_store_key_changes_with_the_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "a.txt").write_text("some text to tokenize " * 20)
    cfg = DataConfig(source=str(tmp_path / "a.txt"))
    current = prepare(cfg)["store"]
    monkeypatch.setattr(build, "STORE_FORMAT", 1)  # A store of the old layout is never opened as new.
    assert prepare(cfg)["store"] != current


@pytest.fixture
def roomy_dir(tmp_path: Path):
    """A directory in memory (/dev/shm) when it has 6 GiB free, else ``tmp_path``.

    Writing 4 GiB to this VM's disk costs ~40 s of system CPU (``dd``: 38 s, where 1 GiB costs
    0.35 s) against ~4 s to tmpfs; the store written is the same.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir() or shutil.disk_usage(shm).free < 6 * 2**30:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="gptjax-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_store_over_4_gib(roomy_dir: Path):
    """2**31 + 2**21 uint16 tokens (4 GiB + 4 MiB), written through the store's writer."""
    shard_tokens = 1 << 28
    block = np.random.default_rng(0).integers(0, 50_257, 1 << 24).astype(np.uint16)
    n = (1 << 31) + (1 << 21)
    writer = store.ShardWriter(roomy_dir, "train", np.dtype(np.uint16), shard_tokens, 50_257, "gpt2")
    for start in range(0, n, len(block)):
        writer.write(block[: min(len(block), n - start)])
    writer.close()
    lengths = writer.shard_lengths()
    assert sum(lengths) == n and len(lengths) == 9
    paths = [store.shard_path(roomy_dir, "train", i) for i in range(len(lengths))]
    assert sum(p.stat().st_size for p in paths) > 4 * 2**30
    tokens = store.ShardedTokens(paths, lengths, np.uint16)
    seq = 1024
    batches = TrainBatches(tokens, seq_len=seq, global_batch=64, seed=0)
    step = int(np.argmax([batches.starts(s).max() for s in range(200)]))
    starts = batches.starts(step)
    assert starts.max() > 2**31  # Windows past int32 offsets...
    expected = block[(starts[:, None] + np.arange(seq + 1)) % len(block)]
    assert np.array_equal(batches.global_batch_at(step), expected.astype(np.int32))
    edge = np.array([n - seq - 1, 8 * shard_tokens - 5, 2**31 - 3])  # ...the last window, a boundary.
    assert np.array_equal(
        tokens.windows(edge, seq + 1), block[(edge[:, None] + np.arange(seq + 1)) % len(block)]
    )
    last = list(eval_batches(tokens[n - 5000 :], seq_len=seq, batch_size=4))
    assert sum(int(w.sum()) for _, w in last) == 4999
    for path in paths:
        path.unlink()


@pytest.mark.slow
def test_bench_data_smoke(tmp_path: Path, gpt2_tokenizer_available):
    """The data benchmark end to end on a 1 MB corpus; its JSON carries every figure."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_data.py"
    args = [
        "--corpus-mb",
        "1",
        "--sample-mb",
        "0.3",
        "--fetches",
        "5",
        "--pools",
        "thread",
        "--tmp",
        str(tmp_path),
    ]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout[run.stdout.index("\n{") :])
    [thread] = result["builds"]
    assert thread["pool"] == "thread" and thread["mb_s"] > 0 and thread["rss_builder_mib"] > 0
    assert result["tiktoken_single_thread_mb_s"] > 0 and result["fetch"]["ratio_median"] > 0


_PROCESS_BUILD = """
import sys
from gptjax.config import DataConfig
from gptjax.data import build, prepare
build.CHUNK_CHARS = 2_000
prepare(DataConfig(source=sys.argv[1]), workers=2, pool="process")
"""


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_worker_processes_leave_with_a_killed_builder(tmp_path: Path, cache: Path):
    corpus = str(_parquet_corpus(tmp_path / "c.parquet", 4000))
    env = {**os.environ, "GPTJAX_CACHE_DIR": str(cache)}
    builder = subprocess.Popen([sys.executable, "-c", _PROCESS_BUILD, corpus], env=env)
    deadline = time.monotonic() + 120
    while len(workers := _descendants(builder.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # The forkserver, the resource tracker and at least one worker.
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert len(workers) >= 3
    deadline = time.monotonic() + 30
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _running(p)]


def test_progress_shows_bytes_per_second_tokens_per_second_and_eta():
    progress, task = build._progress("tokenizing (gpt2)", total=10_000_000)
    progress.update(task, advance=2_500_000, tokens_per_s=build.tokens_per_s_text(1_200_000, 2.0))
    state = progress.tasks[0]
    cells = [str(column.render(state)) for column in progress.columns[2:]]
    assert cells[0].startswith("2.5/10.0 MB") and cells[2] == "0.60 M tok/s"
    assert build.tokens_per_s_text(50_000, 1.0) == "50.0 k tok/s"
    assert {type(c).__name__ for c in progress.columns} >= {"TransferSpeedColumn", "TimeRemainingColumn"}
