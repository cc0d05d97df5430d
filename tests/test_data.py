"""The data pipeline: token stores from every source kind, (seed, step) batches, the eval pass."""

import dataclasses
import gzip
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gptjax.config import DataConfig
from gptjax.data import TrainBatches, build, eval_batches, load_dataset, prepare, sources
from gptjax.errors import GptjaxError


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own store cache; nothing touches ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(folder))
    return folder


def _corpus(folder: Path, n_docs: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: " + "héllo wörld " * (i + 3))
    return folder


def _stores(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


# --------------------------------------------------------------------------------------
# Batches as a function of (seed, step)

_BATCH_DIGESTS = """
import hashlib
import numpy as np
from gptjax.data import TrainBatches
tokens = (np.arange(5000, dtype=np.uint32) * 7919) % 257
for seed in (0, 1):
    batches = TrainBatches(tokens, seq_len=16, global_batch=12, seed=seed)
    print(hashlib.sha256(b"".join(batches.batch(s).tobytes() for s in (0, 1, 2, 30, 1000))).hexdigest())
"""


def _digests_in_fresh_process(hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    run = subprocess.run([sys.executable, "-c", _BATCH_DIGESTS], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_batches_are_a_function_of_seed_and_step_across_processes():
    first, second = _digests_in_fresh_process("1"), _digests_in_fresh_process("2")
    assert first == second and len(first) == 2
    assert first[0] != first[1]  # Seeds 0 and 1 differ.


def test_every_window_start_appears_once_per_epoch():
    seq_len, global_batch = 8, 10
    tokens = np.arange(1003, dtype=np.uint32)  # A token is its own position.
    batches = TrainBatches(tokens, seq_len=seq_len, global_batch=global_batch, seed=3)
    n = batches.n_windows
    assert n % global_batch != 0  # So batches straddle epoch boundaries.
    rows = np.concatenate([batches.global_batch_at(s) for s in range(-(-3 * n // global_batch))])
    assert np.array_equal(rows, rows[:, :1] + np.arange(seq_len + 1))  # Contiguous windows.
    offsets = set()
    for epoch in range(3):
        starts = rows[epoch * n : (epoch + 1) * n, 0].astype(np.int64)
        offset = int(starts.min())
        offsets.add(offset)
        assert 0 <= offset < seq_len
        assert np.array_equal(np.sort(starts), offset + seq_len * np.arange(n))
        assert np.array_equal(starts, batches.epoch_starts(epoch))
    assert len(offsets) > 1  # Epochs shift the window grid, not only reorder it.
    assert not np.array_equal(batches.epoch_starts(0), batches.epoch_starts(1))


@pytest.mark.parametrize("n_tokens", [17, 25, 40])
def test_short_splits_still_give_full_windows(n_tokens: int):
    batches = TrainBatches(np.arange(n_tokens, dtype=np.uint16), seq_len=16, global_batch=4, seed=0)
    for step in range(4):
        rows = batches.global_batch_at(step)
        assert rows.shape == (4, 17) and rows.dtype == np.int32
        assert int(rows.max()) < n_tokens


def test_process_slices_tile_the_global_batch():
    tokens = (np.arange(20_000, dtype=np.uint32) * 31) % 50257
    reference = TrainBatches(tokens, seq_len=32, global_batch=8, seed=5)
    for count in (1, 2, 4):
        slices = [
            TrainBatches(tokens, seq_len=32, global_batch=8, seed=5, process_index=i, process_count=count)
            for i in range(count)
        ]
        for step in (0, 7, 77, 1234):
            parts = [s.batch(step) for s in slices]
            assert all(p.shape == (8 // count, 33) for p in parts)
            assert np.array_equal(np.concatenate(parts), reference.global_batch_at(step))


def test_prefetch_matches_batch_stops_early_and_reraises():
    batches = TrainBatches(np.arange(4000, dtype=np.uint16), seq_len=16, global_batch=4, seed=1)
    fetched = list(batches.prefetch(3, 9, depth=2))
    assert [s for s, _ in fetched] == list(range(3, 9))
    assert all(np.array_equal(b, batches.batch(s)) for s, b in fetched)
    assert [s for s, _ in batches.prefetch(0, 2, depth=0)] == [0, 1]

    before = threading.active_count()
    stream = batches.prefetch(0, 10_000, depth=2)
    next(stream)
    stream.close()  # An early stop: the thread must end, not fill a queue nobody reads.
    for thread in threading.enumerate():
        if thread.name == "gptjax-prefetch":
            thread.join(timeout=5)
    assert threading.active_count() == before

    class Failing(TrainBatches):
        def batch(self, step: int) -> np.ndarray:
            if step == 2:
                raise RuntimeError("disk went away")
            return super().batch(step)

    failing = Failing(np.arange(4000, dtype=np.uint16), seq_len=16, global_batch=4, seed=1)
    with pytest.raises(RuntimeError, match="disk went away"):
        list(failing.prefetch(0, 5, depth=2))


# --------------------------------------------------------------------------------------
# The evaluation pass


@pytest.mark.parametrize("n_tokens", [2, 17, 100, 161])
def test_eval_pass_visits_every_validation_token_once(n_tokens: int):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    seq_len, batch_size = 8, 4
    whole = list(eval_batches(tokens, seq_len=seq_len, batch_size=batch_size))
    targets = []
    for batch, weights in whole:
        assert batch.shape == (batch_size, seq_len + 1) and batch.dtype == np.int32
        assert weights.shape == (batch_size, seq_len) and weights.dtype == np.float32
        targets += batch[:, 1:][weights > 0].tolist()
        inputs = batch[:, :-1][weights > 0]
        assert np.array_equal(inputs + 1, batch[:, 1:][weights > 0])  # Targets are shifted inputs.
    assert targets == list(range(1, n_tokens))
    for count in (2, 4):
        parts = [
            list(
                eval_batches(
                    tokens, seq_len=seq_len, batch_size=batch_size, process_index=i, process_count=count
                )
            )
            for i in range(count)
        ]
        for b, (batch, weights) in enumerate(whole):
            assert np.array_equal(np.concatenate([p[b][0] for p in parts]), batch)
            assert np.array_equal(np.concatenate([p[b][1] for p in parts]), weights)
    assert len(list(eval_batches(tokens, seq_len=seq_len, batch_size=1, max_batches=1))) == 1


# --------------------------------------------------------------------------------------
# Sources and the store


def test_store_is_reused_and_rebuilt_when_the_source_changes(tmp_path: Path, cache: Path):
    corpus = _corpus(tmp_path / "corpus")
    cfg = DataConfig(source=str(corpus), val_fraction=0.1)
    first = prepare(cfg)
    assert first["built"] and first["documents"] == {"train": 36, "val": 4}
    text = b"".join(p.read_bytes() for p in sorted(corpus.iterdir()))
    assert first["train_bytes"] + first["val_bytes"] == len(text)
    assert first["train_tokens"] + first["val_tokens"] == len(text) + 40  # One end-of-text each.
    again = prepare(cfg)
    assert not again["built"] and again["store"] == first["store"]

    (corpus / "doc000.txt").write_text("an edited document")
    edited = prepare(cfg)
    assert edited["built"] and edited["store"] != first["store"]
    assert edited["content_hash"] != first["content_hash"]
    assert not any(name.startswith(".tmp") for name in _stores(cache))


def test_store_is_rebuilt_when_the_tokenizer_changes(tmp_path: Path, gpt2_tokenizer_available: bool):
    cfg = DataConfig(source=str(_corpus(tmp_path / "corpus")), val_fraction=0.1)
    by_bytes = prepare(cfg)
    by_gpt2 = prepare(DataConfig(source=cfg.source, val_fraction=0.1, tokenizer="gpt2"))
    assert by_gpt2["built"] and by_gpt2["store"] != by_bytes["store"]
    assert by_gpt2["train_tokens"] < by_bytes["train_tokens"]
    assert by_gpt2["bytes"] == by_bytes["bytes"] and by_gpt2["content_hash"] == by_bytes["content_hash"]
    ds = load_dataset(
        DataConfig(source=cfg.source, val_fraction=0.1, tokenizer="gpt2"), seq_len=8, vocab_size=50304
    )
    assert ds.tokenizer.decode(ds.train[: ds.meta["tokens"]["train"]].tolist()).startswith("document 0")


_CRASH_BEFORE_RENAME = """
import os, sys
from gptjax.config import DataConfig
from gptjax.data import build, prepare
build._publish = lambda temporary, final: os._exit(3)  # Killed with every file written.
prepare(DataConfig(source=sys.argv[1]))
"""


def test_a_crash_mid_write_leaves_no_store_taken_for_complete(tmp_path: Path, cache: Path):
    corpus = _corpus(tmp_path / "corpus")
    env = {**os.environ, "GPTJAX_CACHE_DIR": str(cache)}
    run = subprocess.run(
        [sys.executable, "-c", _CRASH_BEFORE_RENAME, str(corpus)], env=env, capture_output=True
    )
    assert run.returncode == 3, run.stderr
    leftovers = _stores(cache)
    assert len(leftovers) == 1 and leftovers[0].startswith(".partial-")
    stats = prepare(DataConfig(source=str(corpus)))
    assert stats["built"] and stats["train_documents"] + stats["val_documents"] == 40
    assert _stores(cache) == [Path(stats["store"]).name]


def test_concurrent_writers_leave_one_complete_store(tmp_path: Path, cache: Path, monkeypatch):
    cfg = DataConfig(source=str(_corpus(tmp_path / "corpus")))
    both_building = threading.Barrier(2, timeout=30)
    real_run = build._Build.run

    def build_together(*args):
        meta = real_run(*args)
        both_building.wait()  # Neither publishes before both have a finished copy.
        return meta

    monkeypatch.setattr(build._Build, "run", build_together)
    results: list[dict] = []
    writers = [threading.Thread(target=lambda: results.append(prepare(cfg))) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["store"] == results[1]["store"] and len(_stores(cache)) == 1


def test_jsonl_gzip_and_globs(tmp_path: Path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    records = [{"text": f"record {i}", "id": i} for i in range(5)] + [{"text": ""}]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    with gzip.open(folder / "b.md.gz", "wt", encoding="utf-8") as f:
        f.write("# zipped markdown")
    (folder / "ignored.csv").write_text("not text")
    stats = prepare(DataConfig(source=str(folder), val_fraction=0.2))
    assert stats["train_documents"] + stats["val_documents"] == 6  # The empty record is skipped.
    assert stats["train_bytes"] + stats["val_bytes"] == sum(len(f"record {i}") for i in range(5)) + 17
    only_md = prepare(DataConfig(source=str(folder / "*.md.gz"), val_fraction=0.2))
    assert only_md["tokens"]["train"] + only_md["tokens"]["val"] == 18
    assert only_md["val_from"] == "tail"  # One document: the last fifth of its tokens.


def test_pretokenized_files_in_nanogpt_layout(tmp_path: Path):
    text = "To be, or not to be: that is the question. " * 20
    ids = np.frombuffer(text.encode(), np.uint8).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:100].tofile(tmp_path / "val.bin")
    ds = load_dataset(DataConfig(source=str(tmp_path / "train.bin")), seq_len=32, vocab_size=257)
    assert np.array_equal(ds.train, ids) and np.array_equal(ds.val, ids[:100])
    assert ds.meta["val_from"] == "file" and ds.meta["bytes"] == {"train": len(ids), "val": 100}
    np.save(tmp_path / "tokens.npy", ids.astype(np.int64))
    from_npy = load_dataset(
        DataConfig(source=str(tmp_path / "tokens.npy"), val_fraction=0.1), seq_len=32, vocab_size=257
    )
    assert len(from_npy.train) + len(from_npy.val) == len(ids) and len(from_npy.val) == len(ids) // 10


def test_stdlib_corpus_needs_nothing_from_shared(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    files = sources.stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(p.parts) for p in files)
    ds = load_dataset(DataConfig(), seq_len=128, vocab_size=257)
    assert ds.meta["tokens"]["train"] > 5_000_000 and ds.meta["tokens"]["val"] > 128
    assert ds.train.dtype == np.uint16 and ds.meta["max_token_id"]["train"] == 256
    batch = TrainBatches(ds.train, seq_len=128, global_batch=4, seed=0).batch(0)
    assert ds.tokenizer.decode(batch[0].tolist())  # Python source comes back as text.


def test_tfds_tiny_shakespeare_offline(tmp_path: Path, shared_dir: Path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "input.txt").write_bytes((shared_dir / "data" / "tinyshakespeare.txt").read_bytes())
    cfg = DataConfig(
        source="tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path / "tfds"), tfds_manual_dir=str(manual)
    )
    ds = load_dataset(cfg, seq_len=256, vocab_size=257)
    # TFDS's own 90/5/5 split by characters; the text is ASCII, so bytes are characters.
    assert ds.meta["val_from"] == "split 'validation'"
    assert ds.meta["bytes"] == {"train": 1_003_854, "val": 55_770}
    assert len(ds.train) == 1_003_855 and len(ds.val) == 55_771
    assert bytes(ds.train[:9].astype(np.uint8)) == b"First Cit"
    assert not prepare(cfg)["built"]
    # Without the source's validation split: held out by document, here the tail of one.
    own_split_ignored = prepare(dataclasses.replace(cfg, val_split="", val_fraction=0.01))
    assert own_split_ignored["val_from"] == "tail" and own_split_ignored["val_tokens"] == 10_038


def test_no_validation_split_when_val_fraction_is_zero(tmp_path: Path):
    cfg = DataConfig(source=str(_corpus(tmp_path / "corpus")), val_fraction=0.0)
    ds = load_dataset(cfg, seq_len=16, vocab_size=257)
    assert ds.meta["val_from"] == "none" and len(ds.val) == 0 and ds.meta["documents"]["train"] == 40
    assert list(eval_batches(ds.val, seq_len=16, batch_size=4)) == []


def test_cli_prepare_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture):
    from gptjax.cli import main

    corpus = _corpus(tmp_path / "corpus")
    assert main(["prepare", "--data", str(corpus), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tokenizer"] == "bytes" and stats["train_documents"] + stats["val_documents"] == 40


# --------------------------------------------------------------------------------------
# Bad input: one line that says what to do


def _one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(GptjaxError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_local_inputs(tmp_path: Path):
    _one_line_error("does not exist: give stdlib, a text", prepare, DataConfig(source=str(tmp_path / "no")))
    _one_line_error("no .* files", prepare, DataConfig(source=str(tmp_path / "*.txt")))
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(
        "holds no text: point data.source", prepare, DataConfig(source=str(tmp_path / "empty.txt"))
    )
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    _one_line_error(
        r"set data.text_field to one of \['body'\]", prepare, DataConfig(source=str(tmp_path / "bad.jsonl"))
    )
    _one_line_error("does not exist: give the path", prepare, DataConfig(source=str(tmp_path / "x.bin")))


def test_bad_inputs_for_a_model(tmp_path: Path):
    (tmp_path / "short.txt").write_text("too short for a window")
    short = DataConfig(source=str(tmp_path / "short.txt"), val_fraction=0.1)
    _one_line_error(
        "fewer than one window .* shorter model.block_size", load_dataset, short, seq_len=64, vocab_size=257
    )
    _one_line_error("set model.vocab_size >= 257", load_dataset, short, seq_len=4, vocab_size=100)
    np.save(tmp_path / "ids.npy", np.array([1, 2, 300, 4] * 50, np.uint16))
    _one_line_error(
        r"holds token id 300, outside \[0, 257\) of its tokenizer: .* set data.tokenizer",
        prepare,
        DataConfig(source=str(tmp_path / "ids.npy")),
    )
    with pytest.raises(GptjaxError, match="divide evenly"):
        TrainBatches(np.arange(100), seq_len=8, global_batch=6, seed=0, process_count=4)


def test_bad_tfds_inputs(tmp_path: Path):
    pytest.importorskip("tensorflow_datasets")
    _one_line_error(
        "unknown TFDS dataset 'no_such_corpus'",
        prepare,
        DataConfig(source="tfds:no_such_corpus", tfds_data_dir=str(tmp_path)),
    )
    _one_line_error(
        r"no feature 'body': set data.text_field to one of \['text'\]",
        prepare,
        DataConfig(source="tfds:tiny_shakespeare", text_field="body", tfds_data_dir=str(tmp_path)),
    )


def test_content_hash_is_over_document_text(tmp_path: Path):
    corpus = _corpus(tmp_path / "corpus", n_docs=3)
    content = hashlib.blake2b(digest_size=16)
    for path in sorted(corpus.iterdir()):
        content.update(hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
    assert prepare(DataConfig(source=str(corpus)))["content_hash"] == content.hexdigest()
