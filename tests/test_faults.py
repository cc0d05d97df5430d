"""Faults during training: NaNs, damaged or leftover checkpoints, failed saves, re-runs."""

import importlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gptjax.checkpoint import Checkpointer
from gptjax.config import load_config
from gptjax.errors import GptjaxError

train_lib = importlib.import_module("gptjax.train")


def _config(corpus, run_dir, *overrides):
    return load_config(
        "nano",
        [
            f"data.source={corpus}",
            "data.val_fraction=0.1",
            f"train.run_dir={run_dir}",
            "model.block_size=32",
            "train.steps=6",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_max_batches=1",
            "train.checkpoint_every=2",
            "optim.warmup_steps=1",
            "sample.num_samples=0",  # no test here reads samples
            *overrides,
        ],
    )


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _poison(steps):
    """A batch hook that makes the given (0-based) steps' loss NaN.

    A token id past the vocabulary gathers NaN from the embedding table (jnp.take's
    out-of-bounds fill), as corrupt data would.
    """

    def hook(step, batch):
        if step in steps:
            batch = batch.copy()
            batch[0, 0] = 10**6
        return batch

    return hook


def test_a_nan_step_is_skipped_and_training_continues(corpus, tmp_path):
    clean = train_lib.train(_config(corpus, tmp_path / "clean"), stop_at=2)
    poisoned = train_lib.train(_config(corpus, tmp_path / "poisoned"), stop_at=3, batch_hook=_poison({2}))
    # Step 3 (0-based step 2) was skipped: parameters and Adam's moments are step 2's; the
    # schedule's count advanced with state.step (one step counter), so the lr logged is applied.
    _same(clean.state.params, poisoned.state.params)
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    moments = lambda s: [x for x in jax.tree.leaves(s, is_leaf=is_schedule) if not is_schedule(x)]
    _same(moments(clean.state.opt_state), moments(poisoned.state.opt_state))
    assert int(poisoned.state.step) == 3
    counts = [
        int(x.count) for x in jax.tree.leaves(poisoned.state.opt_state, is_leaf=is_schedule) if is_schedule(x)
    ]
    assert counts == [3]
    rows = {r["step"]: r for r in _rows(tmp_path / "poisoned") if "loss" in r}
    assert rows[3]["skipped"] == 1 and not np.isfinite(rows[3]["loss"])
    assert rows[3]["skipped_total"] == 1
    # The run resumes and finishes normally after the bad step.
    final = train_lib.train(_config(corpus, tmp_path / "poisoned"))
    assert final.step == 6 and np.isfinite(final.metrics["loss"]) and final.metrics["skipped"] == 0


def test_too_many_consecutive_nans_stop_the_run(corpus, tmp_path):
    config = _config(
        corpus, tmp_path / "run", "train.max_bad_steps=2", "train.steps=20", "train.checkpoint_every=1"
    )
    good = train_lib.train(_config(corpus, tmp_path / "good", "train.steps=20"), stop_at=2)
    with pytest.raises(GptjaxError, match="3 consecutive steps .* non-finite"):
        train_lib.train(config, batch_hook=_poison(set(range(2, 20))))
    # Every checkpoint holds good parameters: the last one equals step 2's.
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
    setup = train_lib.build(config)
    last = ckpt.restore(ckpt.latest_step(), setup.abstract_state)
    ckpt.close()
    _same(good.state.params, last.params)


def _array_files(step_dir):
    return [
        p for p in (step_dir / "params").rglob("*") if p.is_file() and p.stat().st_size > 0 and "d" in p.parts
    ]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(corpus, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    train_lib.train(_config(corpus, run_dir), stop_at=4)
    files = _array_files(run_dir / "checkpoints" / "4")
    assert files, "expected array data files in the checkpoint"
    for f in files:
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:8])
        else:
            f.unlink()
    capsys.readouterr()
    result = train_lib.train(_config(corpus, run_dir))
    out, err = capsys.readouterr()
    assert "checkpoint at step 4 is unreadable" in err
    assert "from step 2" in out
    assert result.step == 6


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train_lib.train(_config(corpus, run_dir), stop_at=4)
    for step in ("2", "4"):
        for f in _array_files(run_dir / "checkpoints" / step):
            f.unlink()
    with pytest.raises(GptjaxError, match="no checkpoint .* is readable"):
        train_lib.train(_config(corpus, run_dir))


def test_a_leftover_temporary_checkpoint_is_ignored(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train_lib.train(_config(corpus, run_dir), stop_at=2)
    leftover = run_dir / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    leftover.mkdir()
    (leftover / "junk").write_bytes(b"\x00" * 64)
    capsys.readouterr()
    result = train_lib.train(_config(corpus, run_dir))
    assert "from step 2" in capsys.readouterr().out
    assert result.step == 6


def test_rerun_after_the_final_checkpoint_only_evaluates(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = train_lib.train(_config(corpus, run_dir))
    (run_dir / "result.json").unlink()  # as if killed before the final evaluation finished
    losses_before = [r for r in _rows(run_dir) if "loss" in r]
    capsys.readouterr()
    again = train_lib.train(_config(corpus, run_dir))
    out = capsys.readouterr().out
    assert "compiled" not in out  # no train step was built, let alone run
    assert [r for r in _rows(run_dir) if "loss" in r] == losses_before
    assert json.loads((run_dir / "result.json").read_text())["val_loss"] == pytest.approx(
        first.metrics["val_loss"]
    )
    assert again.step == 6


def test_a_failing_save_is_a_clear_error_and_keeps_earlier_checkpoints(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train_lib.train(_config(corpus, run_dir), stop_at=2)
    original = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step >= 4:
            raise OSError(28, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(
        GptjaxError, match="step 4 .* No space left on device.*earlier checkpoints are intact"
    ):
        train_lib.train(_config(corpus, run_dir))
    monkeypatch.undo()
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2]
    ckpt.close()
    assert train_lib.train(_config(corpus, run_dir)).step == 6
    shutil.rmtree(run_dir)


def test_val_bits_per_byte_matches_gptjax_eval(corpus, tmp_path):
    """The loop's full-pass bits per byte is evaluate.lm_metrics' (N - 1 predictions, not N)."""
    from gptjax.evaluate import lm_metrics
    from gptjax.runs import load

    config = _config(corpus, tmp_path / "run", "train.steps=2", "train.eval_max_batches=0")
    result = train_lib.train(config)
    model = load(result.run_dir).model
    reference = lm_metrics(model, config.data, batch_size=config.train.batch_size)
    assert result.metrics["val_loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert result.metrics["val_bits_per_byte"] == pytest.approx(reference["bits_per_byte"], rel=1e-6)


def test_the_best_checkpoint_by_val_loss_is_kept_with_the_latest(tmp_path):
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), {"w": jnp.ones(2)}, (), jnp.zeros(2, jnp.uint32))
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, async_save=False)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
        ckpt.save(step, state, {"step": step}, metrics={"val_loss": loss})
    ckpt.close()
    assert sorted(Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps()) == [2, 4]


def test_reading_a_run_leaves_an_in_progress_save_alone(corpus, tmp_path):
    """sample/eval during training open the checkpoints read-only: orbax's clean-up of
    temporary directories would delete the save that the trainer is writing."""
    from gptjax import runs

    run_dir = tmp_path / "run"
    train_lib.train(_config(corpus, run_dir), stop_at=2)
    in_progress = run_dir / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    in_progress.mkdir()
    (in_progress / "part").write_bytes(b"\x00" * 64)
    runs.read_config(run_dir)
    runs.load(run_dir)
    assert (in_progress / "part").exists()
