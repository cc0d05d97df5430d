"""The training loop: exact resume, resume on another mesh, SIGTERM, learning on stdlib."""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax import sharding
from gptjax.checkpoint import Checkpointer
from gptjax.config import MeshConfig, load_config
from gptjax.errors import GptjaxError

# gptjax.train is the train() function; the module holds the step builders.
train_lib = importlib.import_module("gptjax.train")

REPO = Path(__file__).resolve().parents[1]


def _config(corpus, run_dir, *overrides):
    return load_config(
        "nano",
        [
            f"data.source={corpus}",
            "data.val_fraction=0.1",
            f"train.run_dir={run_dir}",
            "model.block_size=32",
            "model.resid_dropout=0.1",
            "train.steps=10",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_max_batches=2",
            "train.checkpoint_every=0",
            "optim.warmup_steps=2",
            "sample.num_samples=0",  # samples only where a test reads them
            "sample.max_new_tokens=4",
            *overrides,
        ],
    )


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exact_resume_is_bitwise(corpus, tmp_path, capsys):
    # The straight run also prints samples at step 5: sampling must not perturb training.
    straight = train_lib.train(
        _config(corpus, tmp_path / "straight", "sample.num_samples=1", "train.sample_every=5")
    )
    assert capsys.readouterr().out.count("--- sample 0 ---") == 2  # step 5 and the end
    first = train_lib.train(_config(corpus, tmp_path / "resumed"), stop_at=5)
    assert first.interrupted and first.step == 5
    assert Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() == 5
    resumed = train_lib.train(_config(corpus, tmp_path / "resumed"))
    assert resumed.step == straight.step == 10
    _assert_trees_equal(straight.state.params, resumed.state.params)
    _assert_trees_equal(straight.state.opt_state, resumed.state.opt_state)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")
    assert len(_losses(tmp_path / "resumed")) == 10


def test_a_second_run_of_the_same_shapes_reuses_the_jitted_steps(corpus, tmp_path):
    first = train_lib.build(_config(corpus, tmp_path / "a"))
    assert train_lib.build(_config(corpus, tmp_path / "b")) is first  # another run, same shapes
    other = train_lib.build(_config(corpus, tmp_path / "a", "optim.lr=1e-3"))
    assert other is not first and other.train_step is not first.train_step


@pytest.mark.multidevice
@pytest.mark.default_xla  # bitwise at the default level; 1.4e-6 apart at level 0
def test_resume_onto_a_different_mesh(corpus, tmp_path):
    eight = sharding.make_mesh(MeshConfig(data=4, fsdp=2))
    four = sharding.make_mesh(MeshConfig(data=2, fsdp=2), devices=jax.devices()[:4])
    straight = train_lib.train(_config(corpus, tmp_path / "a"), mesh=eight)
    train_lib.train(_config(corpus, tmp_path / "b"), mesh=eight, stop_at=5)
    resumed = train_lib.train(_config(corpus, tmp_path / "b"), mesh=four)
    assert {d.id for d in jax.tree.leaves(resumed.state.params)[0].sharding.device_set} == {
        d.id for d in jax.devices()[:4]
    }
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert a.keys() == b.keys()
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], atol=1e-6, rtol=0)
    assert resumed.metrics["val_loss"] == pytest.approx(straight.metrics["val_loss"], abs=1e-5)


def test_resume_with_a_different_model_names_the_fields(corpus, tmp_path):
    train_lib.train(_config(corpus, tmp_path / "run"), stop_at=2)
    with pytest.raises(GptjaxError, match=r"different model \(n_layer 2 != 3; n_embd 32 != 48\)"):
        train_lib.train(_config(corpus, tmp_path / "run", "model.n_layer=3", "model.n_embd=48"))


def test_unwritable_run_dir_is_a_clear_error(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(GptjaxError, match="is not writable"):
        train_lib.train(_config(corpus, blocker / "run"))


def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"data.source={corpus}",
        "data.val_fraction=0.1",
        "model.block_size=32",
        "train.steps=100000",
        "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        "train.checkpoint_every=0",
        "optim.warmup_steps=2",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gptjax.cli", "train", "nano", *args, "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if re.match(r"step +3/", line):
            break
    else:
        proc.kill()
        pytest.fail("training did not reach step 3:\n" + "".join(seen))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(seen) + out
    stopped = int(out.split("stop requested; saved step ")[1].split(",")[0])
    assert stopped >= 3
    assert Checkpointer(run_dir / "checkpoints").latest_step() == stopped
    # A re-run continues from the saved step (here to a shorter end, so it finishes).
    config = load_config("nano", [*args, f"train.run_dir={run_dir}", f"train.steps={stopped + 2}"])
    result = train_lib.train(config)
    assert result.step == stopped + 2
    steps = sorted(_losses(run_dir))
    assert steps == list(range(1, stopped + 3))


@pytest.mark.slow
@pytest.mark.default_xla  # 60 steps of a 4-layer model: compiled-code speed outweighs compile time
def test_short_stdlib_run_lowers_validation_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(
        "quickstart",
        [
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=60",
            "train.eval_every=0",
            "train.eval_max_batches=10",
            "train.checkpoint_every=0",
            "sample.num_samples=0",
        ],
    )
    one = sharding.make_mesh(MeshConfig(), jax.devices()[:1])  # its group has 8 devices
    setup = train_lib.build(config, one)
    from gptjax import data as data_lib

    dataset = data_lib.load_dataset(
        config.data, seq_len=config.model.block_size, vocab_size=config.model.vocab_size
    )
    initial = train_lib.evaluate(setup, setup.init().params, dataset.val, config, None)["val_loss"]
    result = train_lib.train(config, mesh=one)
    final = result.metrics["val_loss"]
    print(f"stdlib val loss: initial {initial:.3f} -> final {final:.3f} after 60 steps")
    assert initial > 5.0  # about ln(257) = 5.55 for an untrained byte model
    assert final < initial - 2.0
