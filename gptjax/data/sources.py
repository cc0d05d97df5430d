"""Data: every source becomes one cached token store; every batch is a function of (seed, step).

A *source* (``data.source``) is one of:

* ``stdlib``: the ``.py`` files of the running interpreter's standard library (no tests, no
  site-packages, sorted paths), about 12 MB of text that needs no download.
* a text file, directory or glob of ``.txt``/``.md``/``.py``/``.jsonl`` files, optionally
  gzipped: one document per file, or per JSONL line (the ``data.text_field`` key).
* ``tfds:NAME``: a TensorFlow Datasets builder (its own splits; ``data.tfds_data_dir`` and
  ``data.tfds_manual_dir`` are passed through).
* a pre-tokenized ``.bin`` (uint16, as nanoGPT's prepare scripts write; a ``val.bin`` beside a
  ``train.bin`` is its validation split) or ``.npy`` token file, in ``data.tokenizer``'s ids.

The *store* is a folder ``<cache>/<name>-<tokenizer>-<key>/`` holding ``train.bin`` and
``val.bin`` (flat uint16, or uint32 when the vocabulary needs it; documents each followed by
the end-of-text token) and ``meta.json``. The key hashes the source's identity (paths, sizes
and mtimes), the tokenizer and the split settings, so a changed input gets a new store. A
store is written under a temporary name and renamed into place when complete: a crash leaves
only a ``.tmp-*`` folder that is never read, and of two concurrent writers the second
discards its copy. A source without a validation split of its own has evenly spaced documents
held out, exactly ``floor(n * val_fraction)`` of its n; with fewer than ``1 / val_fraction``
documents, the last ``val_fraction`` of its tokens instead.

*Training windows* are ``seq_len + 1`` tokens starting at ``offset_e + k * seq_len``: epoch
e visits every k once, in a permutation drawn (with its offset ``offset_e < seq_len``) from
``numpy.random.default_rng([seed, e])``. Batch ``step`` holds global positions
``step * global_batch ... + global_batch - 1`` of that endless sequence, so it is a pure
function of (seed, step), and process p of P reads rows ``[p * B/P, (p + 1) * B/P)``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import gzip
import hashlib
import json
import os
import queue
import shutil
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import DataConfig
from gptjax.errors import GptjaxError
from gptjax.tokenizer import Tokenizer, get_tokenizer

STORE_FORMAT = 1  # Bump when the store's layout or splitting rule changes.
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
_CHUNK_BYTES = 2 << 20  # Text per tokenization job.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Dataset:
    """A token store opened for training.

    Attributes:
        train: The training tokens, a read-only memory map.
        val: The validation tokens (empty when ``val_fraction`` is 0 and the source has none).
        tokenizer: The tokenizer that wrote them.
        meta: The store's ``meta.json``: source, tokenizer, and per split the documents,
            tokens, UTF-8 ``bytes`` of text (for bits per byte; for token files, measured by
            decoding) and largest token id, plus a content hash of the source.
        path: The store's folder.
    """

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path


# --------------------------------------------------------------------------------------
# Sources: (identity for the cache key, documents per split, or a token file)


def _source_kind(source: str) -> str:
    if source == "stdlib":
        return "stdlib"
    if source.startswith("tfds:"):
        return "tfds"
    return "tokens" if source.endswith((".bin", ".npy")) else "text"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP)
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _text_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
    elif path.is_file():
        return [path.resolve()]
    else:
        raise GptjaxError(
            f"data source {source!r} does not exist: give stdlib, a text file, directory or glob, "
            "tfds:NAME, or a .bin/.npy token file"
        )
    files = sorted(p.resolve() for p in files if p.name.removesuffix(".gz").endswith(TEXT_SUFFIXES))
    if not files:
        raise GptjaxError(f"no {'/'.join(TEXT_SUFFIXES)} files (or .gz of them) match {source!r}")
    return files


def _file_identity(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), (s := p.stat()).st_size, s.st_mtime_ns) for p in files]


def _read_documents(files: list[Path], text_field: str) -> Iterator[str]:
    """Each file's text (a JSONL file: each line's ``text_field``).

    Text must be UTF-8. A file that is not (binary data, another encoding), that holds NUL
    bytes, or that cannot be read stops the build with an error naming it: training on
    replacement characters would be silently wrong, and skipping files would change the
    corpus without saying so.
    """
    for path in files:
        try:
            yield from _file_documents(path, text_field)
        except UnicodeDecodeError as e:
            byte = e.object[e.start : e.start + 1].hex()
            raise GptjaxError(
                f"{str(path)!r} is not UTF-8 text (byte 0x{byte}: {e.reason}): convert it to UTF-8 "
                "(iconv -t utf-8) or remove it from data.source"
            ) from e
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise GptjaxError(
                f"cannot read {str(path)!r} ({type(e).__name__}: {e}): fix or remove the file"
            ) from e


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if not path.name.removesuffix(".gz").endswith(".jsonl"):
            text = f.read()
            if "\x00" in text:
                raise GptjaxError(
                    f"{str(path)!r} holds NUL bytes, so it is binary, not text: remove it from "
                    "data.source (token ids belong in a .bin or .npy token file)"
                )
            yield text
            return
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {line_number} of {str(path)!r}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptjaxError(f"{where} is not valid JSON ({e.msg}): fix or remove the line") from e
            if not isinstance(record, dict):
                raise GptjaxError(
                    f"{where} is a JSON {type(record).__name__}, not an object with a text field"
                )
            if text_field not in record:
                raise GptjaxError(
                    f"{where} has no {text_field!r} key: set data.text_field to one of {sorted(record)}"
                )
            if not isinstance(record[text_field], str):
                raise GptjaxError(
                    f"{where}: {text_field!r} is a {type(record[text_field]).__name__}, not a string: "
                    "set data.text_field to the key holding the text"
                )
            yield record[text_field]


def _import_tfds() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter.
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError:
        raise GptjaxError("tfds: sources need TensorFlow Datasets: pip install 'gptjax[tfds]'") from None
    # TFDS 4.9.10 imports importlib_resources (a Python < 3.9 backport it does not install)
    # when it prepares a dataset; the standard library's importlib.resources is the same API.
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        import importlib.resources
        import importlib.resources.abc

        sys.modules["importlib_resources"] = importlib.resources
    with contextlib.suppress(RuntimeError):  # Raised once TensorFlow's devices are initialized.
        tf.config.set_visible_devices([], "GPU")  # tf.data reads text; the accelerators are JAX's.
    return tfds


def _tfds_documents(cfg: DataConfig) -> tuple[dict[str, Iterator[str] | None], dict[str, Any]]:
    """Prepares the TFDS builder (offline through manual_dir) and returns its split readers."""
    tfds = _import_tfds()
    name = cfg.source.removeprefix("tfds:")
    try:
        builder = tfds.builder(name, data_dir=cfg.tfds_data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise GptjaxError(f"unknown TFDS dataset {name!r}: check the name in the TFDS catalog") from None
    features = list(builder.info.features.keys())
    if cfg.text_field not in features:
        raise GptjaxError(
            f"TFDS dataset {name!r} has no feature {cfg.text_field!r}: "
            f"set data.text_field to one of {features}"
        )
    download_config = tfds.download.DownloadConfig(manual_dir=cfg.tfds_manual_dir or None)
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # Network, checksum and manual-download errors come in many types.
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise GptjaxError(
            f"TFDS could not prepare {name!r} ({type(e).__name__}: {reason}); offline, put its source "
            "files in data.tfds_manual_dir"
        ) from e
    splits = list(builder.info.splits.keys())
    if cfg.train_split not in splits:
        raise GptjaxError(
            f"TFDS dataset {name!r} has no split {cfg.train_split!r}: set data.train_split to one of {splits}"
        )

    def read(split: str) -> Iterator[str]:
        dataset = builder.as_dataset(split=split, shuffle_files=False).map(lambda ex: ex[cfg.text_field])
        for texts in tfds.as_numpy(dataset.batch(1024)):
            yield from (t.decode("utf-8", errors="replace") for t in texts)

    has_val = bool(cfg.val_split) and cfg.val_split in splits
    documents = {"train": read(cfg.train_split), "val": read(cfg.val_split) if has_val else None}
    return documents, {"version": str(builder.info.version), "splits": splits}


# --------------------------------------------------------------------------------------
# Tokenization into split files


class _SplitWriter:
    """Appends one split's tokens to its file and counts what went in."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.file = open(path, "wb")  # noqa: SIM115 (closed by _build)
        self.stats = {"documents": 0, "bytes": 0, "tokens": 0, "max_token_id": -1}

    def write(self, tokens: np.ndarray, documents: int, n_bytes: int) -> None:
        self.file.write(tokens.astype(self.dtype).tobytes())
        stats = self.stats
        stats["documents"] += documents
        stats["bytes"] += n_bytes
        stats["tokens"] += len(tokens)
        stats["max_token_id"] = max(stats["max_token_id"], int(tokens.max()) if len(tokens) else -1)


def _is_val_document(index: int, fraction: float) -> bool:
    # Bresenham: exactly floor(n * fraction) of the first n documents, evenly spaced.
    return int((index + 1) * fraction) > int(index * fraction)


def _encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Each document's tokens followed by end-of-text, concatenated."""
    eot = np.array([tokenizer.eot_id], np.uint32)
    if tokenizer.name == "bytes":  # UTF-8 bytes are the byte tokenizer's ids: skip int lists.
        arrays = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    else:
        arrays = [np.asarray(tokenizer.encode(t), np.uint32) for t in texts]
    return np.concatenate([a for array in arrays for a in (array, eot)])


def _text_bytes(tokenizer: Tokenizer, tokens: np.ndarray) -> int:
    """UTF-8 bytes of the text behind tokens, end-of-text excluded (pieces may shift a few)."""
    tokens = tokens[tokens != tokenizer.eot_id]
    if tokenizer.name == "bytes":
        return int((tokens < 256).sum())
    return len(tokenizer.decode(tokens.tolist()).encode("utf-8"))


def _progress(description: str, total: float | None):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    progress = Progress(*columns, console=console, disable=not console.is_terminal, transient=True)
    return progress, progress.add_task(description, total=total)


def _tokenize(
    writers: dict[str, _SplitWriter],
    documents: dict[str, Iterable[str] | None],
    tokenizer: Tokenizer,
    val_fraction: float,
    total_bytes: int | None,
) -> str:
    """Tokenizes document streams on a thread pool, in order, into the writers; returns the hash."""
    content = hashlib.blake2b(digest_size=16)  # Over per-document digests, in source order.
    workers = os.cpu_count() or 1
    hold_out = documents.get("val") is None and val_fraction > 0
    chunks: dict[str, list[str]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    pending: collections.deque = collections.deque()  # (split, future, documents, bytes)
    progress, task = _progress(f"tokenizing ({tokenizer.name})", total_bytes)

    def write_ready(limit: int) -> None:
        while pending and (len(pending) > limit or pending[0][1].done()):
            split, future, n_docs, n_bytes = pending.popleft()
            writers[split].write(future.result(), n_docs, n_bytes)
            progress.advance(task, n_bytes)

    def submit(split: str) -> None:
        job = pool.submit(_encode_documents, tokenizer, chunks[split])
        pending.append((split, job, len(chunks[split]), sizes[split]))
        chunks[split], sizes[split] = [], 0
        write_ready(2 * workers)

    with progress, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        index = 0  # Of the document in the train stream, for the hold-out.
        for stream, texts in documents.items():
            for text in texts or ():
                if not text:
                    continue
                data = text.encode("utf-8")
                content.update(hashlib.blake2b(data, digest_size=16).digest())
                split = (
                    "val"
                    if stream == "val" or (hold_out and _is_val_document(index, val_fraction))
                    else "train"
                )
                index += stream == "train"
                chunks[split].append(text)
                sizes[split] += len(data)
                if sizes[split] >= _CHUNK_BYTES:
                    submit(split)
        for split in SPLITS:
            if chunks[split]:
                submit(split)
        write_ready(0)
    return content.hexdigest()


def _copy_tokens(writers: dict[str, _SplitWriter], path: Path, tokenizer: Tokenizer) -> str:
    """Copies a pre-tokenized file (and a ``val`` file beside a ``train`` one); returns the hash."""
    content = hashlib.blake2b(digest_size=16)
    for split, source in zip(SPLITS, _token_files(path), strict=False):
        try:
            tokens = (
                np.load(source, mmap_mode="r")
                if source.suffix == ".npy"
                else np.memmap(source, np.uint16, "r")
            )
        except (ValueError, OSError, EOFError) as e:  # not a .npy file, odd or empty .bin
            raise GptjaxError(
                f"cannot read token file {str(source)!r} ({e}): a .bin holds uint16 ids (an even, "
                "non-zero number of bytes), a .npy a 1-D integer array written by numpy.save"
            ) from e
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise GptjaxError(
                f"token file {str(source)!r} must hold a flat integer array, not {tokens.dtype}"
            )
        for start in range(0, len(tokens), 1 << 24):
            block = np.asarray(tokens[start : start + (1 << 24)])
            content.update(block.tobytes())
            writers[split].write(block, int((block == tokenizer.eot_id).sum()), _text_bytes(tokenizer, block))
        largest = writers[split].stats["max_token_id"]
        if largest >= tokenizer.vocab_size:
            raise GptjaxError(
                f"token file {str(source)!r} has token id {largest} >= the vocabulary size "
                f"{tokenizer.vocab_size} of tokenizer {tokenizer.name!r}: "
                "set data.tokenizer to the one that wrote it"
            )
    return content.hexdigest()


def _hold_out_tail(writers: dict[str, _SplitWriter], tokenizer: Tokenizer, fraction: float) -> None:
    """Moves the last ``fraction`` of the (closed) training file into the empty validation file."""
    train, val = writers["train"], writers["val"]
    n = train.stats["tokens"]
    n_val = int(n * fraction)
    tail = (
        np.array(np.memmap(train.path, train.dtype, "r")[n - n_val :]) if n_val else np.zeros(0, train.dtype)
    )
    val.path.write_bytes(tail.tobytes())
    os.truncate(train.path, (n - n_val) * train.dtype.itemsize)
    val_bytes = _text_bytes(tokenizer, tail)
    val.stats.update(bytes=val_bytes, tokens=n_val, max_token_id=int(tail.max()) if n_val else -1)
    train.stats.update(bytes=max(0, train.stats["bytes"] - val_bytes), tokens=n - n_val)


# --------------------------------------------------------------------------------------
# The store


def cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$GPTJAX_CACHE_DIR``, else ``~/.cache/gptjax``."""
    return Path(cfg.cache_dir or os.environ.get("GPTJAX_CACHE_DIR") or "~/.cache/gptjax").expanduser()


def _token_files(path: Path) -> list[Path]:
    sibling = path.with_name("val" + path.suffix)  # nanoGPT writes train.bin and val.bin.
    return [path, sibling] if path.stem == "train" and sibling.is_file() else [path]


def _store_key(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[str, Any]:
    """The store's folder name and what the source-specific build needs."""
    kind = _source_kind(cfg.source)
    if kind in ("stdlib", "text"):
        files = _stdlib_files() if kind == "stdlib" else _text_files(cfg.source)
        name = "stdlib" if kind == "stdlib" else files[0].stem if len(files) == 1 else "text"
        identity, build = _file_identity(files), files
    elif kind == "tokens":
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise GptjaxError(
                f"token file {cfg.source!r} does not exist: give the path of a .bin or .npy file"
            )
        build = path.resolve()
        identity, name = _file_identity(_token_files(build)), build.stem
    else:
        data_dir = os.path.abspath(os.path.expanduser(cfg.tfds_data_dir)) if cfg.tfds_data_dir else ""
        identity, name, build = [cfg.source, data_dir], cfg.source.removeprefix("tfds:"), None
    splits = (cfg.train_split, cfg.val_split) if kind == "tfds" else ()
    key = [STORE_FORMAT, kind, identity, tokenizer.name, cfg.val_fraction, cfg.text_field, splits]
    digest = hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return f"{safe}-{tokenizer.name}-{digest}", build


def _build(cfg: DataConfig, tokenizer: Tokenizer, folder: Path, build: Any) -> dict[str, Any]:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    kind = _source_kind(cfg.source)
    writers = {s: _SplitWriter(folder / f"{s}.bin", dtype) for s in SPLITS}
    extra: dict[str, Any] = {}
    try:
        if kind == "tokens":
            content_hash = _copy_tokens(writers, build, tokenizer)
        else:
            if kind == "tfds":
                documents, extra = _tfds_documents(cfg)
                total = None
            else:
                documents = {"train": _read_documents(build, cfg.text_field), "val": None}
                total = sum(p.stat().st_size for p in build if p.suffix != ".gz") or None
            content_hash = _tokenize(writers, documents, tokenizer, cfg.val_fraction, total)
    finally:
        for writer in writers.values():
            writer.file.close()
    stats = {s: writers[s].stats for s in SPLITS}
    if stats["train"]["tokens"] + stats["val"]["tokens"] == 0:
        raise GptjaxError(
            f"data source {cfg.source!r} holds no text: point data.source at a non-empty corpus"
        )
    if stats["val"]["tokens"]:
        own_split = kind == "tfds" and documents["val"] is not None
        val_from = "file" if kind == "tokens" else f"split {cfg.val_split!r}" if own_split else "documents"
    elif cfg.val_fraction > 0:
        _hold_out_tail(writers, tokenizer, cfg.val_fraction)
        val_from = "tail"
    else:
        val_from = "none"
    return {
        "format": STORE_FORMAT,
        "source": cfg.source,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_from": val_from,
        **{field: {s: stats[s][field] for s in SPLITS} for field in stats["train"]},
        "content_hash": content_hash,
        **extra,
    }


def _publish(temporary: Path, final: Path) -> bool:
    """Renames a finished store into place; False (and the copy deleted) if another writer won."""
    try:
        os.rename(temporary, final)
        return True
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        return False


def _open_store(cfg: DataConfig) -> tuple[Path, dict[str, Any], Tokenizer, bool]:
    """Builds the store unless a complete one exists; returns (folder, meta, tokenizer, built)."""
    tokenizer = get_tokenizer(cfg.tokenizer)
    name, build = _store_key(cfg, tokenizer)
    final = cache_dir(cfg) / name
    if (final / "meta.json").is_file():
        return final, json.loads((final / "meta.json").read_text()), tokenizer, False
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        start = time.perf_counter()
        meta = _build(cfg, tokenizer, temporary, build)
        meta["build_seconds"] = round(time.perf_counter() - start, 3)
        (temporary / "meta.json").write_text(json.dumps(meta, indent=2))  # Last: marks it complete.
        built = _publish(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final, json.loads((final / "meta.json").read_text()), tokenizer, built


def _memmap(path: Path, dtype: str) -> np.ndarray:
    return np.memmap(path, dtype, "r") if path.stat().st_size else np.zeros(0, dtype)


def prepare(data_cfg: DataConfig) -> dict[str, Any]:
    """Builds (or reuses) the token store of ``data_cfg`` and returns its statistics.

    Returns:
        ``meta.json``'s contents plus ``store`` (its folder), ``built`` (False when an existing
        store was reused), ``store_mb`` and flat ``{split}_{documents,tokens,bytes}`` entries.
    """
    folder, meta, _, built = _open_store(data_cfg)
    size = sum(f.stat().st_size for f in folder.iterdir())
    flat = {f"{s}_{f}": meta[f][s] for s in SPLITS for f in ("documents", "tokens", "bytes")}
    return {**meta, **flat, "store": str(folder), "built": built, "store_mb": round(size / 1e6, 3)}


def load_dataset(data_cfg: DataConfig, *, seq_len: int, vocab_size: int) -> Dataset:
    """Opens the token store of ``data_cfg`` (building it first if needed) for a model.

    Args:
        data_cfg: The data section of the run's config.
        seq_len: The model's context length; the training split needs one window of
            ``seq_len + 1`` tokens.
        vocab_size: The model's vocabulary; the tokenizer and every token id must fit.

    Raises:
        GptjaxError: A source, tokenizer or split that cannot feed this model, with the fix.
    """
    folder, meta, tokenizer, _ = _open_store(data_cfg)
    if tokenizer.vocab_size > vocab_size:
        raise GptjaxError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}: set model.vocab_size >= {tokenizer.vocab_size} or choose a smaller tokenizer"
        )
    largest = max(meta["max_token_id"].values())
    if largest >= vocab_size:
        raise GptjaxError(
            f"the token store holds id {largest} >= model.vocab_size {vocab_size}: raise model.vocab_size"
        )
    tokens = meta["tokens"]
    if tokens["train"] < seq_len + 1:
        raise GptjaxError(
            f"the training split of {data_cfg.source!r} has {tokens['train']} tokens, fewer than one window "
            f"of seq_len + 1 = {seq_len + 1}: use a larger corpus or a shorter model.block_size"
        )
    if tokens["val"] < 2 and data_cfg.val_fraction > 0:
        raise GptjaxError(
            f"the validation split of {data_cfg.source!r} has {tokens['val']} tokens: "
            "raise data.val_fraction or use a larger corpus"
        )
    train, val = (_memmap(folder / f"{s}.bin", meta["dtype"]) for s in SPLITS)
    return Dataset(train=train, val=val, tokenizer=tokenizer, meta=meta, path=folder)


# --------------------------------------------------------------------------------------
# Batches


class TrainBatches:
    """Training batches as a pure function of (seed, step); see the module docstring.

    Args:
        tokens: The training split.
        seq_len: Tokens per input sequence; rows hold ``seq_len + 1`` (inputs, shifted targets).
        global_batch: Rows per step summed over all processes.
        seed: The data seed.
        process_index: This process's index among ``process_count``.
        process_count: Processes that split each global batch by rows.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(tokens) < seq_len + 1:
            raise GptjaxError(
                f"{len(tokens)} tokens are fewer than one window of seq_len + 1 = {seq_len + 1}"
            )
        if global_batch % process_count or not 0 <= process_index < process_count:
            raise GptjaxError(
                f"global batch {global_batch} must divide evenly over {process_count} processes "
                f"(process index {process_index})"
            )
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        # Keep one seq_len of slack when the split allows, so each epoch can shift its grid.
        self.n_windows = max(1, (len(tokens) - seq_len) // seq_len)
        self._max_offset = min(seq_len - 1, len(tokens) - 1 - self.n_windows * seq_len)
        self._epoch = lru_cache(maxsize=4)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        return int(rng.integers(0, self._max_offset + 1)), rng.permutation(self.n_windows)

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Window starts of ``epoch`` in the order its batches visit them."""
        offset, order = self._epoch(epoch)
        return offset + order * self.seq_len

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch's rows at ``step``."""
        positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs, index = np.divmod(positions, self.n_windows)  # A batch may straddle two epochs.
        result = np.empty(self.global_batch, np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            result[mask] = self.epoch_starts(int(epoch))[index[mask]]
        return result

    def _gather(self, starts: np.ndarray) -> np.ndarray:
        return np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], np.int32)

    def batch(self, step: int) -> np.ndarray:
        """This process's rows of the global batch at ``step``: int32 ``[B / P, seq_len + 1]``."""
        rows = self.global_batch // self.process_count
        return self._gather(self.starts(step)[self.process_index * rows : (self.process_index + 1) * rows])

    def global_batch_at(self, step: int) -> np.ndarray:
        """The whole global batch at ``step``: int32 ``[global_batch, seq_len + 1]``."""
        return self._gather(self.starts(step))

    def prefetch(self, start_step: int, end_step: int, depth: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(step, batch(step))`` for steps in ``[start_step, end_step)``, ``depth`` ahead.

        A daemon thread fills the queue. Closing the generator (``close()``, ``break`` out of a
        ``with contextlib.closing(...)``, or garbage collection) stops it; an error in the thread
        is raised here.
        """
        if depth <= 0:
            yield from ((step, self.batch(step)) for step in range(start_step, end_step))
            return
        ready: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def stream() -> None:
            try:
                for step in range(start_step, end_step):
                    if stop.is_set() or not put((step, self.batch(step))):
                        return
                put(None)
            except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
                put(e)

        thread = threading.Thread(target=stream, name="gptjax-prefetch", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One ordered pass over a split: every token after the first is a target exactly once.

    Window k holds tokens ``[k * seq_len, k * seq_len + seq_len + 1)``; the ragged last window
    and the last batch's missing rows are padded (token 0, weight 0) to fixed shapes.

    Yields:
        ``(tokens int32 [batch_size / P, seq_len + 1], weights float32 [batch_size / P, seq_len])``
        for this process's rows of each batch, at most ``max_batches`` (0: all).
    """
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise GptjaxError(f"eval batch {batch_size} must divide evenly over {process_count} processes")
    n_windows = -(-(len(tokens) - 1) // seq_len) if len(tokens) > 1 else 0
    n_batches = -(-n_windows // batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    rows = batch_size // process_count
    offsets = np.arange(seq_len + 1)
    for b in range(n_batches):
        windows = b * batch_size + process_index * rows + np.arange(rows)
        index = windows[:, None] * seq_len + offsets  # (rows, seq_len + 1)
        valid = (index < len(tokens)) & (windows[:, None] < n_windows)
        batch = np.where(valid, np.asarray(tokens[np.where(valid, index, 0)], np.int32), 0).astype(np.int32)
        yield batch, valid[:, 1:].astype(np.float32)
