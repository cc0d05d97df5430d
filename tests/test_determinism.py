"""One seed decides a run: the same seed gives the same run bitwise, another seed another run."""

import importlib
import json

import jax
import numpy as np
import pytest

from gptjax.config import load_config

train_lib = importlib.import_module("gptjax.train")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    text_dir = root / "text"
    text_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        (text_dir / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(["ab", "cd", "ef", "gh"], 300)))
    return text_dir


def _run(corpus, run_dir, seed):
    """Train 4 steps; returns the logged losses, every batch seen, and the final state."""
    config = load_config(
        "nano",
        [
            f"data.source={corpus}",
            "data.val_fraction=0.1",
            f"train.run_dir={run_dir}",
            f"train.seed={seed}",
            "model.block_size=32",
            "model.embd_dropout=0.1",  # so the dropout keys matter too
            "train.steps=4",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_max_batches=1",
            "train.checkpoint_every=0",
            "optim.warmup_steps=1",
            "sample.num_samples=0",
        ],
    )
    batches = {}

    def record(step, batch):
        batches[step] = batch.copy()
        return batch

    result = train_lib.train(config, batch_hook=record)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    return config, losses, batches, result.state


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Seed 7 twice and seed 8 once."""
    root = tmp_path_factory.mktemp("determinism_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTJAX_CACHE_DIR", str(root / "cache"))
        return [_run(corpus, root / name, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8))]


def test_same_seed_same_run_bitwise(runs):
    (_, losses_a, batches_a, state_a), (_, losses_b, batches_b, state_b), _ = runs
    assert sorted(losses_a) == [1, 2, 3, 4]
    assert losses_a == losses_b  # exact float equality, every step
    assert batches_a.keys() == batches_b.keys()
    for step in batches_a:
        np.testing.assert_array_equal(batches_a[step], batches_b[step])
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_another_seed_changes_init_batches_and_curve(runs):
    (config_a, losses_a, batches_a, _), _, (config_b, losses_b, batches_b, _) = runs
    init_a = train_lib.build(config_a).init().params
    init_b = train_lib.build(config_b).init().params
    # Every randomly initialised matrix differs (LayerNorm scales and biases start equal).
    for name in ("wte", "wpe"):
        assert not np.array_equal(
            np.asarray(init_a[name].get_value()), np.asarray(init_b[name].get_value())
        ), name
    assert not np.array_equal(
        np.asarray(init_a["h"]["attn"]["c_attn"].get_value()),
        np.asarray(init_b["h"]["attn"]["c_attn"].get_value()),
    )
    assert batches_a.keys() == batches_b.keys()
    for step in batches_a:
        assert not np.array_equal(batches_a[step], batches_b[step]), f"step {step} batches are equal"
    assert all(losses_a[s] != losses_b[s] for s in losses_a)
