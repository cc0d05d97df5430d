"""Runs are never lost, damaged or hung (issue 19's thirteen reproductions, one test each).

Each test reproduces one way a run was lost, damaged or hung on 09f88dd and checks the
contract that replaced it: a clear one-line error, or a run that resumes with nothing lost.
"""

import errno
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax.checkpoint import Checkpointer
from gptjax.cli import main
from gptjax.config import OptimConfig, load_config
from gptjax.data import prepare
from gptjax.errors import GptjaxError
from gptjax.launch import with_cpu_devices

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
            "train.steps=4",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_max_batches=1",
            "train.checkpoint_every=2",
            "train.peak_flops=1e12",
            "optim.warmup_steps=1",
            "sample.num_samples=0",
            *overrides,
        ],
    )


def _steps(run_dir):
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", read_only=True)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def _restore(config, step):
    ckpt = Checkpointer(Path(config.train.run_dir) / "checkpoints", read_only=True)
    try:
        return ckpt.restore(step, train_lib.build(config).abstract_state)
    finally:
        ckpt.close()


def _rewrite_content(run_dir, step, other):
    """Give step ``step``'s parameters another step's bytes: well-formed files, wrong content.

    (Flipping bytes inside a compressed chunk is caught by the decoder already; bytes that
    decode to other numbers are what only a checksum can catch.)
    """
    import shutil

    target = Path(run_dir) / "checkpoints" / str(step) / "params"
    shutil.rmtree(target)
    shutil.copytree(Path(run_dir) / "checkpoints" / str(other) / "params", target)


def _cli(argv, capsys):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# 1 ------------------------------------------------------------------------------------


def test_1_a_metrics_writer_that_fails_is_an_error_not_a_hang(corpus, tmp_path, monkeypatch):
    from tensorboardX import record_writer

    run_dir = tmp_path / "run"
    config = _config(corpus, run_dir, "train.steps=40")
    train_lib.train(config, stop_at=2)
    original = record_writer.RecordWriter.write

    def disk_full(self, data):  # every TensorBoard event write after the resume fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", disk_full)
    outcome = {}

    def run():
        try:
            train_lib.train(config)
        except Exception as e:
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "training hung after the metrics writer failed"
    monkeypatch.setattr(record_writer.RecordWriter, "write", original)
    assert isinstance(outcome.get("error"), GptjaxError), outcome
    assert "No space left on device" in str(outcome["error"])
    assert 2 in _steps(run_dir)  # the last checkpoint is intact
    assert train_lib.train(config, stop_at=4).step == 4


# 2 ------------------------------------------------------------------------------------


@pytest.fixture
def trained(corpus, tmp_path):
    """A finished 4-step run (checkpoints 2 and 4) and its config."""
    config = _config(corpus, tmp_path / "run")
    train_lib.train(config)
    return config, tmp_path / "run"


def test_2_import_or_export_never_overwrites_a_run(trained, tmp_path, capsys):
    _, run_dir = trained
    before = (run_dir / "config.json").read_text(), _steps(run_dir)
    hf = tmp_path / "hf"
    assert main(["export-hf", str(run_dir), str(hf)]) == 0
    code, err = _cli(["import-hf", str(hf), str(run_dir), "--tokenizer", "bytes"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not empty" in err, err
    code, err = _cli(["export-hf", str(run_dir), str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1 and "holds a gptjax run" in err, err
    assert ((run_dir / "config.json").read_text(), _steps(run_dir)) == before
    assert main(["import-hf", str(hf), str(tmp_path / "new"), "--tokenizer", "bytes"]) == 0


# 3, 4 ---------------------------------------------------------------------------------


def test_3_a_corrupted_checkpoint_of_the_right_size_is_refused(trained, capsys):
    _, run_dir = trained
    _rewrite_content(run_dir, 4, 2)
    code, err = _cli(["sample", str(run_dir), "--max-new-tokens", "2"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "step 4" in err and "checksum" in err, err


def test_4_resuming_past_a_corrupted_checkpoint_keeps_the_good_ones(trained, corpus, capsys):
    config, run_dir = trained
    good = _restore(config, 2)
    _rewrite_content(run_dir, 4, 2)
    capsys.readouterr()
    result = train_lib.train(config)
    out, err = capsys.readouterr()
    assert "checkpoint at step 4 is unreadable" in err and "checksum" in err
    assert "from step 2" in out
    assert result.step == 4 and math.isfinite(result.metrics["val_loss"])
    assert (run_dir / "checkpoints" / "4.unreadable").is_dir()  # set aside, not deleted
    redone = _restore(config, 4)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(redone.params))
    assert not np.array_equal(  # step 4 was trained again from step 2
        np.asarray(jax.tree.leaves(redone.params)[0]), np.asarray(jax.tree.leaves(good.params)[0])
    )


def test_4_a_non_finite_state_is_never_saved_over_good_checkpoints(trained):
    config, run_dir = trained
    state = _restore(config, 4)
    poisoned = state._replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    ckpt = Checkpointer(run_dir / "checkpoints", keep=1)
    with pytest.raises(GptjaxError, match="step 6 holds NaN or inf .* not saved"):
        ckpt.save(6, poisoned, {"config": config.to_dict(), "step": 6})
    ckpt.close()
    assert _steps(run_dir) == [2, 4]


# 5 ------------------------------------------------------------------------------------


def test_5_a_blown_up_update_is_skipped_and_never_checkpointed(corpus, tmp_path):
    run_dir = tmp_path / "run"
    wild = _config(corpus, run_dir, "optim.lr=1e30", "train.steps=8", "train.max_bad_steps=2",
                   "train.checkpoint_every=1", "optim.grad_clip=0")  # fmt: skip
    with pytest.raises(GptjaxError, match="consecutive steps"):
        train_lib.train(wild)
    for step in _steps(run_dir):
        params = _restore(wild, step).params
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
        assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(params)) < 100
    sane = _config(corpus, run_dir, "optim.lr=1e-3", "train.steps=8", "train.checkpoint_every=1",
                   "optim.grad_clip=0")  # fmt: skip
    result = train_lib.train(sane)
    assert result.step == 8 and math.isfinite(result.metrics["loss"])


@pytest.mark.parametrize("lr", [math.inf, math.nan, -1.0, 0.0])
def test_5_the_learning_rate_must_be_finite_and_positive(lr):
    with pytest.raises(GptjaxError, match="lr"):
        OptimConfig(lr=lr)


# 6: SIGTERM outside the loop (tests/test_fault_matrix.py drives every phase) -----------


def _driver_env(tmp_path):
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1),
        "PYTHONUNBUFFERED": "1",
    }


DRIVER = REPO / "tests" / "fault_driver.py"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["compile", "final_eval"])
def test_6_sigterm_outside_the_loop_saves_and_exits_0(corpus, tmp_path, phase):
    run_dir = tmp_path / "run"
    argv = [sys.executable, str(DRIVER), phase, "SIGTERM", "train", "nano", f"data.source={corpus}",
            "data.val_fraction=0.1", "model.block_size=32", "train.steps=4", "train.batch_size=8",
            "train.eval_every=0", "train.eval_max_batches=1", "train.checkpoint_every=2",
            "train.peak_flops=1e12", "optim.warmup_steps=1", "sample.num_samples=0",
            "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=_driver_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = [1] if phase == "compile" else [2, 4]
    assert _steps(run_dir) == expected, proc.stdout


# 7 ------------------------------------------------------------------------------------


def test_7_a_run_whose_checkpoints_were_set_aside_is_not_a_new_run(trained):
    config, run_dir = trained
    for step in (2, 4):
        for f in (run_dir / "checkpoints" / str(step) / "params").rglob("*"):
            if f.is_file() and f.stat().st_size > 0:
                f.write_bytes(f.read_bytes()[:8])
    rows = (run_dir / "metrics.jsonl").read_text()
    for _ in range(2):  # the second re-run finds only *.unreadable folders
        with pytest.raises(GptjaxError, match="no checkpoint .* is readable"):
            train_lib.train(config)
    assert (run_dir / "metrics.jsonl").read_text() == rows


# 8 ------------------------------------------------------------------------------------


def test_8_a_second_writer_is_refused_and_told_who_holds_the_run(trained, capsys):
    from gptjax.runs import RunLock

    config, run_dir = trained
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom gptjax.runs import RunLock\n"
         f"with RunLock({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(60)"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GptjaxError, match=f"in use by pid {holder.pid} "):
            train_lib.train(config)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_dir):  # a killed holder leaves no stale lock
        pass
    assert train_lib.train(config).step == 4


# 9 ------------------------------------------------------------------------------------


def test_9_stop_at_a_step_already_reached_does_nothing(corpus, tmp_path, capsys):
    config = _config(corpus, tmp_path / "run", "train.steps=8")
    train_lib.train(config, stop_at=2)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = train_lib.train(config, stop_at=2)
    assert "already reached --stop-at 2" in capsys.readouterr().out
    assert again.step == 2 and again.interrupted
    assert _steps(tmp_path / "run") == [2]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows


# 10, 11 -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, 257])
def test_10_token_ids_outside_the_vocabulary_are_refused_at_prepare(tmp_path, monkeypatch, bad_id):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tokens.npy"
    np.save(path, np.array([1, 2, bad_id, 3] * 100, np.int64))
    with pytest.raises(GptjaxError, match=f"token id {bad_id}, outside \\[0, 257\\)"):
        prepare(load_config("nano", [f"data.source={path}"]).data)


def test_11_a_batch_larger_than_the_corpus_is_refused_before_any_work(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", "train.batch_size=100000000")
    start = time.perf_counter()
    with pytest.raises(GptjaxError, match="train.batch_size \\(100000000\\) is larger than"):
        train_lib.train(config)
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "run" / "checkpoints").exists() or not _steps(tmp_path / "run")


# 12 -----------------------------------------------------------------------------------


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_12_children_die_with_a_killed_launcher(tmp_path):
    slow = tmp_path / "slow.py"  # a config file that takes a minute to load: children that wait
    slow.write_text("import time\ntime.sleep(120)\n")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gptjax.cli", "launch", "--processes", "2", "--", "info", str(slow)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(children := _children(launcher.pid)) < 2:
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)  # the children are past exec
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [c for c in children if _alive(c)]
    for c in survivors:
        os.kill(c, signal.SIGKILL)
    assert not survivors, "children outlived their launcher"


# 13 -----------------------------------------------------------------------------------


def test_13_a_failing_save_is_one_line_naming_its_step(corpus, tmp_path, monkeypatch, capsys):
    import orbax.checkpoint as ocp

    run_dir = tmp_path / "run"
    args = ["train", "nano", f"data.source={corpus}", "data.val_fraction=0.1", "model.block_size=32",
            "train.steps=4", "train.batch_size=8", "train.eval_every=0", "train.eval_max_batches=1",
            "train.checkpoint_every=2", "train.peak_flops=1e12", "optim.warmup_steps=1",
            "sample.num_samples=0", "--run-dir", str(run_dir)]  # fmt: skip
    original = ocp.CheckpointManager.save

    def full_disk(self, step, *a, **k):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    code, err = _cli(args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "step 4" in err and "No space left" in err and "earlier checkpoints are intact" in err
    assert _steps(run_dir) == [2]


def test_13_an_unusable_cache_directory_is_one_line(corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = _cli(["prepare", "--data", str(corpus), "--cache-dir", str(blocker / "cache")], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot write the token store" in err, err


def test_13_temporaries_of_killed_builds_and_exports_are_removed(trained, corpus, tmp_path, monkeypatch):
    config, run_dir = trained
    cache = tmp_path / "cache"
    store = Path(prepare(config.data)["store"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = cache / f".tmp-{store.name}-{dead.pid}-deadbeef"
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"\0" * 10)
    for p in (leftover / "train.bin", leftover):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    import shutil

    shutil.rmtree(store)
    prepare(config.data)
    assert not leftover.exists()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / ".tmp-12345-model.safetensors").write_bytes(b"half")
    assert main(["export-hf", str(run_dir), str(hf)]) == 0
    assert sorted(p.name for p in hf.iterdir() if p.name.startswith(".tmp")) == []


def test_13_a_rerun_of_a_finished_run_logs_its_final_evaluation_once(trained):
    config, run_dir = trained
    (run_dir / "result.json").unlink()  # as if killed after the final checkpoint
    train_lib.train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [4]


def test_13_resuming_with_another_data_source_is_refused(trained, tmp_path):
    config, run_dir = trained
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("some other text " * 500)
    with pytest.raises(GptjaxError, match="trained on other data .*data.source"):
        train_lib.train(_config(other, run_dir, "train.steps=8"))
