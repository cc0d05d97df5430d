"""Test setup: one CPU device (8 fake ones for ``multidevice`` tests), JAX's persistent
compilation cache, and the offline assets. All set before jax is imported.

Nano models train faster on one device than on 8 fake devices sharing the cores, so the
suite runs on one; tests marked ``multidevice`` (sharding, meshes, multi-host) run in a
second pytest process with 8 devices (``GPTJAX_TEST_DEVICES``), and tests marked
``beside`` (SLURM, kill-and-restart) in one process per file, all started as soon as the
tests are collected so that they run beside this one (most tests here leave a core idle
while they compile or wait on a subprocess); their reports are printed at the end.
Every process of the suite, subprocesses included, shares one compilation cache directory
(per run unless ``JAX_COMPILATION_CACHE_DIR`` is set), so a step compiled once is loaded after.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# XLA:CPU's LLVM optimisation passes are most of a nano model's compile time, and compiles are
# most of what the suite's short runs spend: at backend optimisation level 0 the same tests
# take ~25 % less CPU time (measured). Subprocesses inherit it through XLA_FLAGS; tests that
# change the device count keep it (gptjax.launch.with_cpu_devices).
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _XLA_FLAGS:
    _XLA_FLAGS = f"{_XLA_FLAGS} --xla_backend_optimization_level=0".strip()
DEVICES = int(os.environ.get("GPTJAX_TEST_DEVICES", "1"))
os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS} --xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptjax-test-jax-cache-")
# Artifacts that tests build once and reuse, in this process and in the multidevice one.
os.environ.setdefault("GPTJAX_TEST_SHARED_DIR", tempfile.mkdtemp(prefix="gptjax-test-shared-"))
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
# Tests run in their own pytest processes, started once the tests are collected, beside
# this session: ``multidevice`` on 8 devices, ``beside`` (tests that mostly wait on other
# processes: a SLURM scheduler, killed and restarted trainings) on one. Each report is
# printed at the end, and a failure there fails this run.

_GROUPS = {  # marker -> what its process's environment changes
    "multidevice": {"GPTJAX_TEST_DEVICES": "8", "XLA_FLAGS": _XLA_FLAGS},
    "beside": {"GPTJAX_TEST_GROUP": "beside"},
}


def pytest_configure(config):
    config.addinivalue_line("markers", "multidevice: needs 8 (fake CPU) devices; run in a subprocess")
    config.addinivalue_line("markers", "beside: mostly waits on other processes; run in a subprocess")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    if DEVICES >= 8 or os.environ.get("GPTJAX_TEST_GROUP"):
        return  # this is one of the groups' processes
    started = []
    for marker, env in _GROUPS.items():
        marked = [item for item in items if item.get_closest_marker(marker)]
        if not marked:
            continue
        items[:] = [item for item in items if not item.get_closest_marker(marker)]
        config.hook.pytest_deselected(items=marked)
        if config.option.collectonly:
            continue
        groups = [marked]
        if marker == "beside":  # one process per file, so that their waits overlap
            groups = [[i for i in marked if i.path == p] for p in dict.fromkeys(i.path for i in marked)]
        started += [_start_group(config, marker, env, group) for group in groups]
    config.stash[_GROUP_PROCS] = started


def _start_group(config, marker: str, env: dict, group: list) -> tuple:
    """A pytest process for ``group``, its output to a temporary file read at the end."""
    args = ["-p", "no:cacheprovider", "-q", *(["-x"] if config.option.maxfail == 1 else [])]
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (read and closed at session end)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args, *(item.nodeid for item in group)],
        env={**os.environ, **env},
        cwd=config.rootpath,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return marker, len(group), proc, log


def pytest_sessionfinish(session, exitstatus):
    groups = session.config.stash.get(_GROUP_PROCS, [])
    if groups and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = exitstatus = pytest.ExitCode.OK  # every test was in a group
    for marker, count, proc, log in groups:
        if exitstatus not in (0, 1):  # interrupted or an internal error: stop the others too
            proc.terminate()
            proc.wait()
            log.close()
            continue
        rc = proc.wait()
        log.seek(0)
        where = "on 8 devices" if marker == "multidevice" else "on one device"
        print(f"\n--- {count} {marker} test(s), run beside these {where} in a subprocess ---")
        print(log.read(), end="", flush=True)
        log.close()
        if rc != 0:
            session.exitstatus = rc


_GROUP_PROCS = pytest.StashKey[list]()
