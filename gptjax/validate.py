"""Input checks that refuse, before any work starts, what would otherwise fail late or silently.

Each function raises :class:`~gptjax.errors.GptjaxError` with a one-line message that says
what to change; callers run them as soon as the numbers they need are known.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from gptjax.errors import GptjaxError


def token_ids(block: np.ndarray, vocab_size: int, source: str | Path) -> None:
    """Every id of a pre-tokenized block lies in ``[0, vocab_size)``.

    Checked before the ids are cast to the store's unsigned dtype, where -1 would
    silently become 65535.
    """
    if block.size == 0:
        return
    low, high = int(block.min()), int(block.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise GptjaxError(
            f"token file {str(source)!r} holds token id {bad}, outside [0, {vocab_size}) of its tokenizer: "
            "fix the file, or set data.tokenizer to the one that wrote it"
        )


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not reported on this platform
        return 0


def train_batch(batch_size: int, seq_len: int, train_tokens: int, source: str) -> None:
    """A global batch fits the training split and this host's memory.

    A batch of more windows than the split holds repeats every window several times in
    one step; one that does not fit in memory would page for minutes before failing.
    """
    windows = max(1, (train_tokens - seq_len) // seq_len)
    if batch_size > windows:
        raise GptjaxError(
            f"train.batch_size ({batch_size}) is larger than the {windows} windows of "
            f"{seq_len} tokens in the training split of {source!r}: lower train.batch_size or use more data"
        )
    batch_bytes = batch_size * (seq_len + 1) * 4  # the int32 batch on the host, before any activation
    memory = _host_memory()
    if memory and batch_bytes > memory // 2:
        raise GptjaxError(
            f"one batch of train.batch_size ({batch_size}) x {seq_len + 1} tokens needs "
            f"{batch_bytes / 2**30:.1f} GiB, more than half of this host's {memory / 2**30:.1f} GiB: "
            "lower train.batch_size (optim.accum_steps splits a batch into micro-batches)"
        )


def cache_error(directory: Path, e: OSError) -> GptjaxError:
    """The one-line error for a token-store cache that cannot be written."""
    return GptjaxError(
        f"cannot write the token store under {str(directory)!r} ({e.strerror or e}): set data.cache_dir "
        "(or GPTJAX_CACHE_DIR) to a writable directory with free space"
    )


def remove_dead_temporaries(directory: Path, prefix: str, stale_seconds: float = 600) -> None:
    """Delete ``PREFIX<pid>-*`` folders of builders that are gone.

    A build killed with SIGKILL cannot clean up after itself; the next build of the same
    store does. A folder counts as abandoned when no process of its pid exists here and
    nothing in it changed for ``stale_seconds`` (a builder on another host of a shared
    file system keeps writing).
    """
    import shutil
    import time

    for path in directory.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            changed = max([f.stat().st_mtime for f in path.iterdir()] + [path.stat().st_mtime])
        except OSError:
            continue
        if time.time() - changed > stale_seconds:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def at_least(**bounds: tuple[float, float]) -> None:
    """``name=(value, minimum)`` pairs: each value a finite number >= its minimum.

    For command-line numbers (``--batch-size``, ``--shots``, ``--budget``) that reach no
    config dataclass to validate them.
    """
    for name, (value, minimum) in bounds.items():
        flag = "--" + name.replace("_", "-")
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= minimum):
            raise GptjaxError(f"{flag} ({value}) must be a number >= {minimum}")


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def image_path(out: str | Path) -> Path:
    """An image file to write: a known suffix, and not an existing directory."""
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise GptjaxError(f"--out {str(out)!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if out.is_dir():
        raise GptjaxError(f"--out {str(out)!r} is a directory: give a file name like {out / 'attention.png'}")
    return out


def attention_kernel(attention: str) -> None:
    """``model.attention=cudnn`` needs a GPU; elsewhere it fails deep in XLA."""
    import jax

    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise GptjaxError(
            f"model.attention=cudnn needs a GPU, and this backend is {jax.default_backend()}: "
            "use model.attention=auto or xla"
        )
