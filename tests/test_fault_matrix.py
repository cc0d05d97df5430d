"""The fault matrix: SIGKILL and SIGTERM at every phase of a run, full disks, corrupted
checkpoints and two writers. Every case ends in a clear error with nothing lost, or in a
resume whose final state and loss curve are bitwise those of the uninterrupted run.

Signals come from ``tests/fault_driver.py``, which runs ``gptjax train`` in a subprocess
and signals itself at the named phase. Each killed run is then finished in-process and
compared with one reference run shared by all cases.
"""

import errno
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax.checkpoint import Checkpointer
from gptjax.config import load_config
from gptjax.data import prepare
from gptjax.errors import GptjaxError

train_lib = importlib.import_module("gptjax.train")
REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "fault_driver.py"
pytestmark = pytest.mark.slow

STEPS = 6
OVERRIDES = [
    "data.val_fraction=0.1",
    "model.block_size=32",
    f"train.steps={STEPS}",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_max_batches=1",
    "train.checkpoint_every=2",
    "train.peak_flops=1e12",
    "optim.warmup_steps=1",
    "sample.num_samples=1",
    "sample.max_new_tokens=2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, its token store, the environment for subprocesses and the reference run."""
    tmp = tmp_path_factory.mktemp("fault_matrix")
    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(["ab", "cd", "ef", "gh"], 300)))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "GPTJAX_CACHE_DIR": str(tmp / "cache"),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTJAX_CACHE_DIR", env["GPTJAX_CACHE_DIR"])
        config = _config(corpus, tmp / "reference")
        prepare(config.data)
        train_lib.train(config)
    return {"tmp": tmp, "corpus": corpus, "env": env, "reference": _final(config)}


def _config(corpus, run_dir, *extra):
    return load_config("nano", [f"data.source={corpus}", *OVERRIDES, f"train.run_dir={run_dir}", *extra])


def _final(config):
    """The final state and the per-step training losses of a finished run."""
    run_dir = Path(config.train.run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        assert ckpt.latest_step() == STEPS
        state = ckpt.restore(STEPS, train_lib.build(config).abstract_state)
    finally:
        ckpt.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len({s for s, _ in losses}) == len(losses), f"steps logged twice: {losses}"
    evals = [r["step"] for r in rows if "val_loss" in r]
    assert len(set(evals)) == len(evals), f"evaluations logged twice: {evals}"
    return state, dict(losses)


def _same_as_reference(world, config):
    state, losses = _final(config)
    ref_state, ref_losses = world["reference"]
    assert losses == ref_losses
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _drive(world, run_dir, phase, signame):
    argv = [sys.executable, str(DRIVER), phase, signame, "train", "nano",
            f"data.source={world['corpus']}", *OVERRIDES, "--run-dir", str(run_dir)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, env=world["env"], timeout=300)


PHASES = ["compile", "loop", "eval", "save", "final_eval", "final_save", "samples"]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("phase", PHASES)
def test_a_signal_at_any_phase_resumes_bitwise(world, tmp_path, monkeypatch, phase, signame):
    run_dir = tmp_path / "run"
    proc = _drive(world, run_dir, phase, signame)
    assert f"{signame} at {phase}" in proc.stdout, proc.stdout + proc.stderr
    if signame == "SIGTERM":  # a stop request: save, exit 0, one line at most on stderr
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
    else:
        assert proc.returncode == -9
    monkeypatch.setenv("GPTJAX_CACHE_DIR", world["env"]["GPTJAX_CACHE_DIR"])
    config = _config(world["corpus"], run_dir)
    assert train_lib.train(config).step == STEPS
    _same_as_reference(world, config)


@pytest.mark.parametrize("target", ["checkpoint", "metrics", "tensorboard"])
def test_a_full_disk_is_a_clear_error_and_the_run_resumes_bitwise(world, tmp_path, monkeypatch, target):
    """ENOSPC from the checkpoint writer, metrics.jsonl or the TensorBoard writer mid-run."""
    import orbax.checkpoint as ocp
    from tensorboardX import record_writer

    monkeypatch.setenv("GPTJAX_CACHE_DIR", world["env"]["GPTJAX_CACHE_DIR"])
    config = _config(world["corpus"], tmp_path / "run")
    train_lib.train(config, stop_at=2)
    full = OSError(errno.ENOSPC, "No space left on device")
    if target == "checkpoint":
        original = ocp.CheckpointManager.save
        monkeypatch.setattr(
            ocp.CheckpointManager, "save", lambda self, step, *a, **k: (_ for _ in ()).throw(full)
        )
    elif target == "metrics":
        from gptjax import metrics

        class FillingFile:  # metrics.jsonl on a disk that fills up after a few rows
            def __init__(self, *args, **kwargs):
                self._file = open(*args, **kwargs)  # noqa: SIM115
                self.name, self.rows = self._file.name, 0

            def write(self, text):
                self.rows += 1
                if self.rows > 3:
                    raise full
                return self._file.write(text)

            def close(self):
                self._file.close()

        monkeypatch.setattr(metrics, "open", FillingFile, raising=False)
    else:
        original = record_writer.RecordWriter.write
        calls = []

        def write(self, data):
            calls.append(1)
            if len(calls) > 20:
                raise full
            return original(self, data)

        monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    with pytest.raises(GptjaxError, match="No space left on device"):
        train_lib.train(config)
    monkeypatch.undo()
    monkeypatch.setenv("GPTJAX_CACHE_DIR", world["env"]["GPTJAX_CACHE_DIR"])
    assert train_lib.train(config).step == STEPS
    _same_as_reference(world, config)


def test_a_full_cache_directory_is_a_clear_error(world, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    from gptjax import data

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.store.ShardWriter, "write", full)
    with pytest.raises(GptjaxError, match="cannot write the token store .*No space left"):
        prepare(_config(world["corpus"], tmp_path / "run").data)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_corrupted_checkpoint_content_resumes_bitwise_from_the_previous(world, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", world["env"]["GPTJAX_CACHE_DIR"])
    config = _config(world["corpus"], tmp_path / "run")
    train_lib.train(config, stop_at=4)
    files = [p for p in (tmp_path / "run" / "checkpoints" / "4").rglob("*") if p.is_file()]
    target = max((p for p in files if "params" in p.parts), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    target.write_bytes(bytes(data))
    assert train_lib.train(config).step == STEPS
    _same_as_reference(world, config)


def test_two_writers_one_refused_nothing_lost(world, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", world["env"]["GPTJAX_CACHE_DIR"])
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, str(DRIVER), "none", "SIGTERM", "train", "nano", f"data.source={world['corpus']}",
         *OVERRIDES, "--run-dir", str(run_dir)],
        env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in first.stdout:  # the first writer holds the run once it resumes or starts
        if "new run in" in line:
            break
    config = _config(world["corpus"], run_dir)
    with pytest.raises(GptjaxError, match=f"in use by pid {first.pid}"):
        train_lib.train(config)
    first.stdout.read()
    assert first.wait(timeout=300) == 0
    _same_as_reference(world, config)
