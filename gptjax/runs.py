"""Run directories: find a checkpoint, read its config, load the model it holds; check
that a directory can be written and that a checkpoint fits the model about to use it.

A run directory (``runs/<name>``) holds ``config.json``, ``metrics.jsonl``, TensorBoard
files and ``checkpoints/<step>/``. Anything that needs a trained model (sampling,
evaluation, export, initialising a new run) goes through :func:`load`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import NamedTuple

import jax
from flax import nnx

from gptjax import checkpoint
from gptjax import model as model_lib
from gptjax.checkpoint import Checkpointer
from gptjax.config import Config
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.tokenizer import Tokenizer, get_tokenizer


class Loaded(NamedTuple):
    """What :func:`load` returns; unpacks as ``model, config, tokenizer``."""

    model: GPT
    config: Config
    tokenizer: Tokenizer


def locate(path: str | Path) -> tuple[Path, int]:
    """The checkpoints directory and step of a run directory, checkpoints dir or step dir."""
    path = Path(path)
    if not path.exists():
        raise GptjaxError(
            f"{str(path)!r} does not exist: give a run directory written by gptjax train or import-hf"
        )
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent, int(path.name)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = checkpoint.steps(directory)
    if not found:
        raise GptjaxError(f"no checkpoint in {str(path)!r}: train first (gptjax train --run-dir {path})")
    return directory, found[-1]


def load_params(path: str | Path, abstract_params: nnx.State) -> tuple[nnx.State, dict]:
    """Restore a checkpoint's parameters into ``abstract_params``'s shapes and shardings."""
    directory, step = locate(path)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        return ckpt.restore_params(step, abstract_params), meta
    except GptjaxError:
        raise
    except Exception as e:  # orbax raises many types for a damaged directory
        raise _unreadable(directory, step, e) from e
    finally:
        ckpt.close()


def _unreadable(directory: Path, step: int, e: Exception) -> GptjaxError:
    return GptjaxError(
        f"the checkpoint at step {step} in {str(directory)!r} cannot be read ({type(e).__name__}: "
        f"{str(e)[:160]}): it is damaged; give an earlier step's directory ({directory}/STEP)"
    )


def read_config(path: str | Path) -> tuple[Config, dict]:
    """The config (and the whole meta record) stored with a run's latest checkpoint."""
    directory, step = locate(path)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        meta = ckpt.read_meta(step)
    except Exception as e:  # orbax raises many types for a damaged directory
        raise _unreadable(directory, step, e) from e
    finally:
        ckpt.close()
    return Config.from_dict(meta["config"]), meta


def load(path: str | Path, *, shardings: nnx.State | None = None) -> Loaded:
    """Load the model, config and tokenizer of a run directory or checkpoint.

    Args:
        path: A run directory, its ``checkpoints`` directory, or one step's directory.
        shardings: Where to put the parameters (a tree of shardings as made by
            :func:`gptjax.sharding.param_shardings`); default: the first device.
    """
    config, meta = read_config(path)
    graphdef, abstract = model_lib.abstract(config.model)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params, _ = load_params(path, target)
    return Loaded(nnx.merge(graphdef, params), config, get_tokenizer(meta["tokenizer"]))


def ensure_dir(path: str | Path, what: str = "directory") -> Path:
    """Create ``path`` (and parents); a file in the way or no permission is a clear error."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptjaxError(f"cannot create {what} {str(path)!r} ({e.strerror}): give a new path") from e
    return path


def write_params_run(run_dir: str | Path, config: Config, params: nnx.State, tokenizer: str) -> Path:
    """Write parameters alone as a run (step 0) that ``load``, ``sample`` and ``init_from`` accept.

    The directory must be new or empty: writing into a run would let checkpoint retention
    delete its trained steps and overwrite its ``config.json``.
    """
    if Path(run_dir).is_dir() and any(Path(run_dir).iterdir()):
        raise GptjaxError(f"{str(run_dir)!r} is not empty (it may hold a run): give a new directory")
    run_dir = ensure_dir(run_dir, "run directory")
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        ckpt.save_params(0, params, {"config": config.to_dict(), "tokenizer": tokenizer, "step": 0})
    finally:
        ckpt.close()
    (run_dir / "config.json").write_text(config.to_json())
    return run_dir


def check_compatible(saved: dict, config: Config, step: int, directory: Path) -> None:
    """Raise if a checkpoint's saved config has other parameters than ``config.model``.

    Fields that change how the computation runs (dropout, dtype, attention, remat,
    scan_layers) may differ; the error names every field that may not.
    """
    saved_model = saved.get("config", {}).get("model", {})
    current = dataclasses.asdict(config.model)
    free = {"embd_dropout", "attn_dropout", "resid_dropout", "dtype", "attention", "remat", "scan_layers"}
    diffs = [
        f"{k} {saved_model.get(k)!r} != {v!r}"
        for k, v in current.items()
        if k not in free and saved_model.get(k) != v
    ]
    if diffs:
        raise GptjaxError(
            f"the checkpoint at step {step} in {directory} was trained with a different model "
            f"({'; '.join(diffs)}): use a new train.run_dir or the checkpoint's model config"
        )


def prepare_run_dir(config: Config) -> Path:
    """The run directory (created), or a one-line error if this process cannot write to it."""
    run_dir = Path(config.train.run_dir or Path("runs") / config.name)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise GptjaxError(
            f"run directory {str(run_dir)!r} is not writable ({e.strerror}): choose another --run-dir"
        ) from e
    return run_dir


class RunLock:
    """An advisory lock on a run directory, held while one process writes to it.

    ``fcntl.flock`` locks die with their process, so a killed run never leaves a stale
    lock; the lock file names the holder so that a second writer can say who it is.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True):
        self.path = Path(run_dir) / ".lock"
        self.enabled = enabled  # one process of a multi-process run holds it
        self._file = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        try:
            self._file = open(self.path, "a+")  # noqa: SIM115
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise GptjaxError(
                f"{self.path.parent} is in use by {holder}: wait for it to finish or stop it, "
                "or give another --run-dir"
            ) from None
        except OSError as e:
            raise GptjaxError(f"cannot lock {self.path} ({e.strerror}): choose another --run-dir") from e
        self._file.truncate(0)
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])})\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
