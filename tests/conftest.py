"""Test setup: one CPU device (8 fake ones for ``multidevice`` tests), JAX's persistent
compilation cache, and the offline assets. All set before jax is imported.

Nano models train faster on one device than on 8 fake devices sharing the cores, so the
suite runs on one, on two xdist workers (``addopts`` in pyproject.toml); tests marked
``multidevice`` (sharding, meshes, multi-host) run in a pytest process of their own with 8
devices (``GPTJAX_TEST_DEVICES``), tests marked ``default_xla`` in another with XLA's
default compile settings, and tests marked ``beside`` (SLURM, kill-and-restart) in a third,
a worker per file; all start with the session and run beside it (most tests leave a core
idle while they compile or wait on a subprocess). Their reports are printed at the end.
Every process of the suite, subprocesses included, shares one compilation cache directory
(per run unless ``JAX_COMPILATION_CACHE_DIR`` is set), so a step compiled once is loaded
after.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # the caller's (in workers and groups: the session's)
DEVICES = int(os.environ.get("GPTJAX_TEST_DEVICES", "1"))
_GROUP = os.environ.get("GPTJAX_TEST_GROUP", "")  # set in a group's process (and its workers)
# Compiles are most of what the suite's short runs spend, so it compiles for speed of
# compiling: XLA:CPU at backend optimisation level 0 (LLVM's passes are most of a nano
# model's compile) and without the MLIR fusion emitters (each fusion is its own MLIR ->
# LLVM pipeline): a 20-step nano run, 9.6 -> 6.5 CPU-s, its compiles 4.1 -> 1.4 s
# (measured). The code runs slower (a 60-step 4-layer run: 31 CPU-s at the default, 49
# with both), so tests marked ``default_xla`` keep XLA's defaults: long runs, and a run
# resumed onto a smaller mesh, bitwise the uninterrupted one there and 1.4e-6 apart at
# level 0 (measured). Subprocesses inherit XLA_FLAGS; tests that change the device count
# keep the rest (gptjax.launch.with_cpu_devices).
# A run started with GPTJAX_TEST_DEVICES=8 runs every selected test itself, on 8 devices at
# XLA's defaults.
_DIRECT = "GPTJAX_TEST_DEVICES" in os.environ and not _GROUP
_flags = _XLA_FLAGS
if not _DIRECT and _GROUP != "default_xla":
    for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
        if _flag.split("=")[0] not in _flags:  # the caller's own setting wins
            _flags += f" {_flag}"
os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_MADE: list[str] = []  # the run's temporary directories this process made: removed at its end
for _name, _prefix in [
    ("JAX_COMPILATION_CACHE_DIR", "gptjax-test-jax-cache-"),
    ("GPTJAX_TEST_SHARED_DIR", "gptjax-test-shared-"),  # artifacts built once per run
]:
    if _name not in os.environ:  # workers and group processes inherit the session's
        os.environ[_name] = tempfile.mkdtemp(prefix=_prefix)
        _MADE.append(os.environ[_name])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests needing it skip with a reason when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared (offline assets for developers and CI) is absent")
    return SHARED


@pytest.fixture(scope="session")
def suite_dir() -> Path:
    """A directory shared by this run's pytest processes, for artifacts built once per run."""
    return Path(os.environ["GPTJAX_TEST_SHARED_DIR"])


@pytest.fixture(scope="session")
def gpt2_tokenizer_available(shared_dir: Path) -> bool:
    if not (shared_dir / "tiktoken-cache").is_dir():
        pytest.skip("../shared/tiktoken-cache is absent: the gpt2 vocabulary cannot be loaded offline")
    return True


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """A small local text corpus (40 documents of random words) and a private store cache."""
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import"]
    for i in range(40):
        (text_dir / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 300)) + "\n")
    return text_dir


# --------------------------------------------------------------------------------------
# Groups of tests that run in pytest processes of their own, started with the session and
# running beside it: ``multidevice`` on 8 devices, ``default_xla`` on 8 with XLA's default
# compile settings, ``beside`` (tests that mostly wait on other processes: a SLURM
# scheduler, killed and restarted trainings) on one, a worker per file. Each group process
# collects with the session's own arguments and keeps only its marker's tests; the session
# (its xdist workers) leaves them out. Each group's report is printed at the end, and a
# failure there fails the run.

_EIGHT = {"GPTJAX_TEST_DEVICES": "8", "XLA_FLAGS": _XLA_FLAGS}
_GROUPS = {  # marker -> (what its process's environment changes, extra pytest arguments)
    "default_xla": (_EIGHT, ["-n", "0"]),  # before multidevice: its tests are both
    "multidevice": (_EIGHT, ["-n", "2", "--dist", "loadfile"]),
    "beside": ({}, ["-n", "2", "--dist", "loadfile"]),
}
_STARTS_GROUPS = not _GROUP and not _DIRECT


def pytest_configure(config):
    config.addinivalue_line("markers", "multidevice: needs 8 (fake CPU) devices; run in a group process")
    config.addinivalue_line("markers", "beside: mostly waits on other processes; run in a group process")
    config.addinivalue_line("markers", "default_xla: 8 devices, XLA's default compile settings, in a group")


def _group_of(item) -> str:
    return next((marker for marker in _GROUPS if item.get_closest_marker(marker)), "")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    if _DIRECT:
        return  # everything selected runs here
    other = [item for item in items if _group_of(item) != _GROUP]
    if other:
        items[:] = [item for item in items if _group_of(item) == _GROUP]
        config.hook.pytest_deselected(items=other)


def pytest_sessionstart(session):
    config = session.config
    if not _STARTS_GROUPS or hasattr(config, "workerinput") or config.option.collectonly:
        return  # a group's process, an xdist worker, or only listing tests
    started = []
    for marker, (env, extra) in _GROUPS.items():
        args = [*config.invocation_params.args, "-p", "no:cacheprovider", "-q", *extra]
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (read and closed at session end)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *args],
            env={**os.environ, **env, "GPTJAX_TEST_GROUP": marker},
            cwd=config.invocation_params.dir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((marker, proc, log))
    config.stash[_GROUP_PROCS] = started


def pytest_sessionfinish(session, exitstatus):
    groups = session.config.stash.get(_GROUP_PROCS, [])
    if groups and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = exitstatus = pytest.ExitCode.OK  # every test was in a group
    for marker, proc, log in groups:
        if exitstatus not in (0, 1):  # interrupted or an internal error: stop the others too
            proc.terminate()
            proc.wait()
            log.close()
            continue
        rc = proc.wait()
        log.seek(0)
        if rc != pytest.ExitCode.NO_TESTS_COLLECTED:  # none of the selected tests is in it
            where = "on one device" if marker == "beside" else "on 8 devices"
            print(f"\n--- the {marker} tests, run beside these {where} in a process of their own ---")
            print(log.read(), end="", flush=True)
            if rc != 0:
                session.exitstatus = rc
        log.close()


_GROUP_PROCS = pytest.StashKey[list]()


def pytest_unconfigure(config):
    for directory in _MADE:  # after the workers and groups, which use them, have ended
        shutil.rmtree(directory, ignore_errors=True)
