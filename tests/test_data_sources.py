"""Every source kind on small generated files: Parquet, zstd and gzip JSONL, hf-disk, hf (offline)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gptjax.config import DataConfig
from gptjax.data import load_dataset, prepare
from gptjax.errors import GptjaxError

TEXTS = [f"document {i}: " + "naïve café " * (i % 7 + 1) for i in range(60)]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _expected(texts: list[str]) -> np.ndarray:
    """The byte tokenizer's store content: each document's UTF-8 bytes, then end-of-text (256)."""
    return np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8), 256) for t in texts])


def _all_tokens(cfg: DataConfig) -> np.ndarray:
    """Train and validation tokens put back in document order (hold-out is every 1/f-th document)."""
    ds = load_dataset(cfg, seq_len=8, vocab_size=257)
    return np.concatenate([np.asarray(ds.train), np.asarray(ds.val)])


def _write_parquet(path: Path, texts: list[str], row_group_size: int = 7, **columns) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(len(texts))), "content": texts, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_files_directories_and_globs(tmp_path: Path):
    folder = tmp_path / "pq"
    folder.mkdir()
    _write_parquet(folder / "part-0.parquet", TEXTS[:30])
    _write_parquet(folder / "part-1.parquet", TEXTS[30:])
    cfg = DataConfig(source=str(folder), text_field="content", val_fraction=0.0)
    stats = prepare(cfg)
    assert stats["train_documents"] == 60 and stats["train_bytes"] == sum(len(t.encode()) for t in TEXTS)
    assert np.array_equal(_all_tokens(cfg), _expected(TEXTS))
    one = prepare(DataConfig(source=str(folder / "part-1.parquet"), text_field="content", val_fraction=0))
    assert one["train_documents"] == 30
    glob_stats = prepare(DataConfig(source=str(folder / "*.parquet"), text_field="content", val_fraction=0))
    assert glob_stats["content_hash"] == stats["content_hash"]
    held_out = prepare(DataConfig(source=str(folder), text_field="content", val_fraction=0.1))
    assert held_out["documents"] == {"train": 54, "val": 6} and held_out["val_from"] == "documents"


def test_parquet_errors_name_the_file_and_the_fix(tmp_path: Path):
    path = _write_parquet(tmp_path / "a.parquet", TEXTS[:3])
    with pytest.raises(
        GptjaxError, match=r"no column 'text': set data.text_field to one of \['id', 'content'\]"
    ):
        prepare(DataConfig(source=str(path)))
    with pytest.raises(GptjaxError, match="column 'id' .* holds int64, not strings"):
        prepare(DataConfig(source=str(path), text_field="id"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(GptjaxError, match="broken.parquet' is not a readable Parquet file"):
        prepare(DataConfig(source=str(tmp_path / "broken.parquet")))


def test_zstd_and_gzip_jsonl(tmp_path: Path):
    zstandard = pytest.importorskip("zstandard")
    lines = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(TEXTS))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    zst = DataConfig(source=str(tmp_path / "a.jsonl.zst"), val_fraction=0.0)
    assert np.array_equal(_all_tokens(zst), _expected(TEXTS))
    gz = prepare(DataConfig(source=str(tmp_path / "b.jsonl.gz"), val_fraction=0.0))
    assert gz["content_hash"] == prepare(zst)["content_hash"]
    both = prepare(DataConfig(source=str(tmp_path / "*.jsonl.*"), val_fraction=0.0))
    assert both["train_documents"] == 120
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(GptjaxError, match="cannot read .*bad.jsonl.zst.*fix or remove the file"):
        prepare(DataConfig(source=str(tmp_path / "bad.jsonl.zst")))
    (tmp_path / "field.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"body": "x"}\n'))
    with pytest.raises(
        GptjaxError, match=r"line 1 of .*field.jsonl.zst.* set data.text_field to one of \['body'\]"
    ):
        prepare(DataConfig(source=str(tmp_path / "field.jsonl.zst")))


def test_hugging_face_dataset_saved_to_disk(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(60))}).save_to_disk(str(single))
    cfg = DataConfig(source=f"hf-disk:{single}", val_fraction=0.0)
    assert np.array_equal(_all_tokens(cfg), _expected(TEXTS))

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": TEXTS[:50]}),
            "validation": datasets.Dataset.from_dict({"text": TEXTS[50:]}),
        }
    ).save_to_disk(str(splits))
    ds = load_dataset(DataConfig(source=f"hf-disk:{splits}"), seq_len=8, vocab_size=257)
    assert ds.meta["val_from"] == "split 'validation'" and ds.meta["documents"] == {"train": 50, "val": 10}
    assert np.array_equal(np.asarray(ds.val), _expected(TEXTS[50:]))

    with pytest.raises(GptjaxError, match=r"no column 'body': set data.text_field to one of \['text', 'n'\]"):
        prepare(DataConfig(source=f"hf-disk:{single}", text_field="body"))
    with pytest.raises(GptjaxError, match="no split 'training': set data.train_split"):
        prepare(DataConfig(source=f"hf-disk:{splits}", train_split="training"))
    with pytest.raises(GptjaxError, match="no folder .* give the folder datasets' save_to_disk wrote"):
        prepare(DataConfig(source=f"hf-disk:{tmp_path / 'nowhere'}"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("not a dataset")
    with pytest.raises(GptjaxError, match="is not a dataset saved with save_to_disk"):
        prepare(DataConfig(source=f"hf-disk:{tmp_path / 'plain'}"))


def test_hub_streaming_path_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``hf:`` streams through datasets.load_dataset; a local folder exercises it without the Hub."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    # Both libraries read the switch when imported; set it where they look now.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for split, texts in (("train", TEXTS[:50]), ("validation", TEXTS[50:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = load_dataset(DataConfig(source=f"hf:{tmp_path}"), seq_len=8, vocab_size=257)
    assert ds.meta["val_from"] == "split 'validation'" and ds.meta["documents"] == {"train": 50, "val": 10}
    assert np.array_equal(np.asarray(ds.train), _expected(TEXTS[:50]))
    with pytest.raises(GptjaxError, match="cannot stream 'hf:nobody/no-such-corpus' .* use hf-disk:PATH"):
        prepare(DataConfig(source="hf:nobody/no-such-corpus"))
