"""Mixtures: weighted sources, batches a pure function of (seed, step), per-source validation loss."""

import json
from pathlib import Path

import numpy as np
import pytest

from gptjax.config import DataConfig, load_config
from gptjax.data import MixtureBatches, load_dataset, train_batches
from gptjax.errors import GptjaxError


def _parts(sizes=(5000, 3000, 900)) -> list[np.ndarray]:
    """Source i's tokens lie in [100 i, 100 i + 100): a row tells which source it came from."""
    return [(100 * i + np.arange(n) % 100).astype(np.uint16) for i, n in enumerate(sizes)]


def test_realised_proportions_over_any_1000_steps(tmp_path: Path):
    weights = [0.7, 0.2, 0.1]
    for global_batch in (1, 8):
        batches = MixtureBatches(
            list(zip(weights, _parts(), strict=True)), seq_len=16, global_batch=global_batch, seed=3
        )
        sources = np.concatenate([batches.sources(s) for s in range(4000)])
        counts = np.stack([np.cumsum(np.concatenate([[0], sources == i])) for i in range(3)])
        window = 1000 * global_batch
        for start in range(0, len(sources) - window + 1, 97):
            share = (counts[:, start + window] - counts[:, start]) / window
            assert np.abs(share - weights).max() < 0.02
            # Balanced sequences: a few rows off at most, not a sampling error.
            assert np.abs(share * window - np.array(weights) * window).max() <= 3
        rows = np.concatenate([batches.global_batch_at(s) for s in range(50)])
        assert np.array_equal(rows[:, 0] // 100, np.concatenate([batches.sources(s) for s in range(50)]))


def test_mixture_batches_are_a_function_of_seed_and_step_and_tile_over_processes():
    parts = list(zip([3.0, 1.0], _parts((4000, 2500)), strict=True))
    reference = MixtureBatches(parts, seq_len=16, global_batch=8, seed=5)
    again = MixtureBatches(parts, seq_len=16, global_batch=8, seed=5)
    other_seed = MixtureBatches(parts, seq_len=16, global_batch=8, seed=6)
    for step in (0, 3, 1000, 123_456):
        assert np.array_equal(reference.global_batch_at(step), again.global_batch_at(step))
        for count in (2, 4):
            slices = [
                MixtureBatches(
                    parts, seq_len=16, global_batch=8, seed=5, process_index=i, process_count=count
                )
                for i in range(count)
            ]
            assert np.array_equal(
                np.concatenate([s.batch(step) for s in slices]), reference.global_batch_at(step)
            )
    assert not np.array_equal(reference.global_batch_at(0), other_seed.global_batch_at(0))
    # Each source walks its own epochs: every window of source 1 once before any repeats.
    stream = reference.streams[1]
    positions = np.arange(200 * 8)
    source, local = reference.assign(positions)
    assert np.array_equal(local[source == 1], np.arange((source == 1).sum()))
    starts = stream.starts_at(local[source == 1][: stream.n_windows])
    assert len(set(starts.tolist())) == stream.n_windows


def test_mixture_config_from_the_command_line_and_a_config_file(tmp_path: Path):
    cfg = load_config("nano", ["data.mixture=web=0.7:data/web,code=0.3:hf-disk:/data/code"])
    assert cfg.data.mixture == ("web=0.7:data/web", "code=0.3:hf-disk:/data/code")
    from_file = DataConfig(mixture=["web=0.7:data/web", "code=0.3:data/code"])
    assert from_file.mixture == ("web=0.7:data/web", "code=0.3:data/code")
    for bad in ("web:0.7=data", "web=-1:data", "web=x:data", "web=1:a,web=2:b"):
        with pytest.raises(GptjaxError, match="data.mixture"):
            DataConfig(mixture=bad)


def _texts(folder: Path, letter: str, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i}.txt").write_text(f"{letter * 5} {i} " * 30)
    return folder


@pytest.mark.slow  # Compiles a train step: about 15 s on an idle 2-core machine.
def test_a_mixture_dataset_and_training_reports_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    web, code = _texts(tmp_path / "web", "w", 40), _texts(tmp_path / "code", "c", 40)
    data = DataConfig(mixture=(f"web=0.75:{web}", f"code=0.25:{code}"), val_fraction=0.1)
    ds = load_dataset(data, seq_len=16, vocab_size=257)
    assert list(ds.parts) == ["web", "code"] and [w for w, _ in ds.parts.values()] == [0.75, 0.25]
    assert len(ds.val) == sum(len(d.val) for _, d in ds.parts.values())
    batches = train_batches(ds, seq_len=16, global_batch=8, seed=0)
    rows = np.concatenate([batches.global_batch_at(s) for s in range(100)])
    share_web = np.mean([ord("w") in r or ord("c") not in r for r in rows.tolist()])
    assert abs(share_web - 0.75) < 0.05

    from gptjax import train

    config = load_config(
        "nano",
        [
            f"data.mixture=web=0.75:{web},code=0.25:{code}",
            "data.val_fraction=0.1",
            f"train.run_dir={tmp_path / 'run'}",
            "model.block_size=16",
            "train.steps=2",
            "optim.warmup_steps=1",
            "train.batch_size=8",
            "train.checkpoint_every=0",
            "train.eval_max_batches=1",
            "sample.num_samples=0",
        ],
    )
    result = train(config)
    assert {"val_loss", "val_loss_web", "val_loss_code"} <= set(result.metrics)
    assert result.metrics["val_loss_web"] != result.metrics["val_loss_code"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss_code" in row for row in logged)
