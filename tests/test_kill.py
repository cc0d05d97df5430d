"""SIGKILL at random moments: every restart resumes from the last committed checkpoint and
the finished run is bitwise the run that was never interrupted.

One 40-step run with a checkpoint every 2 steps (so asynchronous saves are nearly always
in flight) is killed over and over, at moments drawn from a seeded generator:

* ``save``: once a new checkpoint has committed, right after the progress line of the
  next checkpoint step, i.e. while that step's asynchronous save is being written;
* ``steps``: once a new checkpoint has committed, just after one of the next 3 steps' lines;
* ``startup``: up to a second after the restore (compile, first steps).

After each kill the checkpoint directory is read as the dead process left it: the latest
committed step is the highest step directory without orbax's temporary suffix. The
restart must print "resuming ... from step K" with exactly that K (or start a new run if
nothing was committed). Subprocesses use one CPU device and a persistent compilation
cache so a restart costs seconds, not a compile.
"""

import importlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax.checkpoint import Checkpointer
from gptjax.config import load_config
from gptjax.data import prepare
from gptjax.launch import with_cpu_devices

train_lib = importlib.import_module("gptjax.train")
REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 40, 2
MIN_KILLS = 10
pytestmark = [pytest.mark.slow, pytest.mark.beside]  # restarts training processes: mostly waits


def _overrides(corpus: Path) -> list[str]:
    return [
        f"data.source={corpus}",
        "data.val_fraction=0.1",
        "model.block_size=32",
        f"train.steps={STEPS}",
        "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.peak_flops=1e12",  # skips the matmul probe at start-up
        "optim.warmup_steps=2",
        "sample.num_samples=0",
    ]


class _Training:
    """``gptjax train`` in a subprocess; its output lines arrive on a queue with arrival times."""

    def __init__(self, corpus: Path, run_dir: Path, env: dict):
        cmd = [
            sys.executable,
            "-m",
            "gptjax.cli",
            "train",
            "nano",
            *_overrides(corpus),
            "--run-dir",
            str(run_dir),
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next line, or None at the end of the output."""
        line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        if line is not None:
            self.seen.append(line)
        return line

    def wait_for(self, pattern: str, deadline: float) -> re.Match | None:
        while (line := self.next_line(deadline)) is not None:
            if match := re.search(pattern, line):
                return match
        return None

    def output(self) -> str:
        while (line := self.lines.get(timeout=60)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def _committed(run_dir: Path) -> tuple[int | None, list[str]]:
    """The newest committed step and the names of uncommitted (temporary) entries."""
    directory = run_dir / "checkpoints"
    names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    steps = [int(n) for n in names if n.isdigit()]
    return max(steps, default=None), sorted(n for n in names if not n.isdigit())


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert len(steps) == len(set(steps)), f"steps logged twice in {run_dir}: {sorted(steps)}"
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _final_state(config, run_dir: Path):
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        assert ckpt.latest_step() == STEPS
        return ckpt.restore(STEPS, train_lib.build(config).abstract_state)
    finally:
        ckpt.close()


def test_sigkill_at_random_moments_resumes_bitwise(tmp_path, monkeypatch):
    corpus = tmp_path / "text"
    corpus.mkdir()
    words = np.random.default_rng(0)
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(words.choice(["ab", "cd", "ef", "gh"], 300)))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "GPTJAX_CACHE_DIR": str(tmp_path / "cache"),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    config = load_config("nano", _overrides(corpus))
    monkeypatch.setenv("GPTJAX_CACHE_DIR", env["GPTJAX_CACHE_DIR"])
    prepare(config.data)  # the token store exists before any process can be killed

    reference = _Training(corpus, tmp_path / "reference", env)  # also fills the compile cache
    out = reference.output()
    assert reference.proc.wait(timeout=300) == 0, out

    run_dir = tmp_path / "killed"
    rng = np.random.default_rng(1234)
    trials: list[dict] = []
    while True:
        committed, _ = _committed(run_dir)
        proc = _Training(corpus, run_dir, env)
        deadline = time.monotonic() + 240
        resumed = proc.wait_for(r"resuming .* from step (\d+)|new run in", deadline)
        assert resumed, proc.output()
        expected = "new run in" if committed is None else f"from step {committed}"
        assert expected in resumed.group(0), (
            f"trial {len(trials)}: the last committed step at the kill was {committed}, "
            f"but the restart said {resumed.group(0)!r}\n" + "".join(proc.seen)
        )
        if committed is not None and committed >= STEPS - 2 * CHECKPOINT_EVERY or len(trials) >= 30:
            break  # let this one finish
        mode = rng.choice(["save", "save", "steps", "steps", "startup"])
        if mode != "startup":  # wait for a new committed checkpoint, so every such trial progresses
            while (_committed(run_dir)[0] or 0) <= (committed or 0) and proc.proc.poll() is None:
                assert time.monotonic() < deadline, "".join(proc.seen)
                time.sleep(0.01)
            newest = _committed(run_dir)[0] or 0
        if mode == "save":  # just after the next checkpoint step's line: its async save is in flight
            proc.wait_for(rf"^step +{newest + CHECKPOINT_EVERY}/", deadline)
            time.sleep(rng.uniform(0, 0.02))
        elif mode == "steps":  # just after a random step's line, between or during saves
            proc.wait_for(rf"^step +{newest + int(rng.integers(1, 4))}/", deadline)
            time.sleep(rng.uniform(0, 0.05))
        else:  # after the restore: during compile or the first steps
            time.sleep(rng.uniform(0, 1.0))
        if proc.proc.poll() is not None:  # it finished first: no kill, the next restart ends it
            out = proc.output()
            assert proc.proc.returncode == 0, out
            continue
        proc.proc.kill()
        proc.proc.wait(timeout=60)
        after, temporary = _committed(run_dir)
        trials.append({"mode": str(mode), "before": committed, "after": after, "temporary": temporary})
        proc.output()  # drain

    out = proc.output()
    assert proc.proc.wait(timeout=300) == 0, out
    kills = len(trials)
    during_saves = sum(bool(t["temporary"]) for t in trials)
    print(f"\nSIGKILL trials: {kills}, {during_saves} with a save in flight")
    for t in trials:
        print(f"  {t}")
    assert kills >= MIN_KILLS, trials
    assert during_saves >= 1, f"no kill landed during an asynchronous save: {trials}"

    assert _losses(run_dir) == _losses(tmp_path / "reference")
    ours, theirs = _final_state(config, run_dir), _final_state(config, tmp_path / "reference")
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
