"""Building a token store: parallel tokenization, a progress bar, resumption, atomic publishing.

The build reads a source's documents in order on the main thread and hands chunks of about
``CHUNK_CHARS`` characters to a pool of one worker per core (:mod:`gptjax.data.workers`:
processes by default, or threads; ``scripts/bench_data.py`` measures both), which return
each chunk's tokens per split and per-document digests. Results are written in submission
order, so the store does not depend on timing or on the pool.

A build happens in ``<cache>/.partial-<name>/``, locked by its builder. After each chunk is
written the builder records, atomically, how many documents it consumed and how many tokens
each split holds. A build killed at any moment resumes from that record: shards are cut
back to the recorded lengths and the documents before it are read again (for the content
hash and the hold-out count) but not tokenized. The finished folder gets ``meta.json`` and
is renamed into place; readers only open folders with ``meta.json``, so a store is never
read half-written. A second builder that finds the partial folder locked builds a private
copy, and of two finished copies the second is discarded.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import validate
from gptjax.config import DataConfig
from gptjax.data import sources, store
from gptjax.data.store import SPLITS
from gptjax.data.workers import encode_chunk, make_pool
from gptjax.errors import GptjaxError
from gptjax.tokenizer import Tokenizer, get_tokenizer

STORE_FORMAT = 2  # Bump when the store's layout or splitting rule changes. 2: shards and an index.
CHUNK_CHARS = 1 << 20  # Text per tokenization job.


def cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$GPTJAX_CACHE_DIR``, else ``~/.cache/gptjax``."""
    return Path(cfg.cache_dir or os.environ.get("GPTJAX_CACHE_DIR") or "~/.cache/gptjax").expanduser()


def store_name(cfg: DataConfig, tokenizer: Tokenizer, source: sources.Source) -> str:
    """The store's folder name: the source's name, the tokenizer and a hash of all that decides it."""
    splits = (cfg.train_split, cfg.val_split) if source.kind in ("tfds", "hf", "hf-disk") else ()
    key = [
        STORE_FORMAT,
        source.kind,
        source.identity,
        tokenizer.name,
        cfg.val_fraction,
        cfg.text_field,
        splits,
    ]
    digest = hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)[:40]
    return f"{safe}-{tokenizer.name}-{digest}"


# --------------------------------------------------------------------------------------
# Progress


def _progress(description: str, total: int | None):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tokens_per_s]}"),
        TimeRemainingColumn(),
    )
    progress = Progress(*columns, console=console, disable=not console.is_terminal, transient=True)
    return progress, progress.add_task(description, total=total, tokens_per_s="")


def tokens_per_s_text(tokens: int, seconds: float) -> str:
    rate = tokens / max(seconds, 1e-9)
    return f"{rate / 1e6:.2f} M tok/s" if rate >= 1e5 else f"{rate / 1e3:.1f} k tok/s"


# --------------------------------------------------------------------------------------
# The build


def _is_val_document(index: int, fraction: float) -> bool:
    # Bresenham: exactly floor(n * fraction) of the first n documents, evenly spaced.
    return int((index + 1) * fraction) > int(index * fraction)


class _Build:
    """One build in ``folder``, resumable from its ``progress.json``."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, source: sources.Source, folder: Path):
        self.cfg, self.tokenizer, self.source, self.folder = cfg, tokenizer, source, folder
        self.record_path = folder / "progress.json"
        record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else None
        if record is None or source.kind == "tokens":
            record = {"stage": "stream", "position": 0, "shard_tokens": store.SHARD_TOKENS, "stats": {}}
        self.record = record
        self.resumed_from = record["position"]
        self.dtype = store.token_dtype(tokenizer.vocab_size)
        self.writers = {
            s: store.ShardWriter(
                folder,
                s,
                self.dtype,
                record["shard_tokens"],
                tokenizer.vocab_size,
                tokenizer.name,
                record["stats"].get(s),
            )
            for s in SPLITS
        }

    def commit(self, **changes: Any) -> None:
        for writer in self.writers.values():
            writer.flush()
        self.record.update(changes, stats={s: dict(w.stats) for s, w in self.writers.items()})
        store.write_json(self.record_path, self.record)

    def run(self, workers: int, pool_kind: str) -> dict[str, Any]:
        try:
            if self.source.kind == "tokens":
                content_hash = self._copy_tokens()
            else:
                content_hash = self._tokenize(workers, pool_kind)
            self.record["content_hash"] = content_hash
            stats = {s: self.writers[s].stats for s in SPLITS}
            if stats["train"]["tokens"] + stats["val"]["tokens"] == 0:
                raise GptjaxError(
                    f"data source {self.cfg.source!r} holds no text: point data.source at a non-empty corpus"
                )
            val_from = self._val_from()
        finally:
            for writer in self.writers.values():
                writer.close()
        return {
            "format": STORE_FORMAT,
            "source": self.cfg.source,
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.tokenizer.vocab_size,
            "dtype": self.dtype.name,
            "val_from": val_from,
            **{f: {s: self.writers[s].stats[f] for s in SPLITS} for f in self.writers["train"].stats},
            "content_hash": content_hash,
            "shard_tokens": self.record["shard_tokens"],
            "shards": {s: self.writers[s].shard_lengths() for s in SPLITS},
            **{k: v for k, v in self.source.extra.items() if k != "own_val"},
        }

    def _val_from(self) -> str:
        if self.record["stage"] != "stream":  # The tail was being moved when the build stopped.
            self._hold_out_tail()
            return "tail"
        if self.writers["val"].stats["tokens"]:
            kind = self.source.kind
            if kind == "tokens":
                return "file"
            return f"split {self.cfg.val_split!r}" if self.source.extra.get("own_val") else "documents"
        if self.cfg.val_fraction > 0:
            self.commit(stage="streamed")
            self._hold_out_tail()
            return "tail"
        return "none"

    def _tokenize(self, workers: int, pool_kind: str) -> str:
        cfg, tokenizer = self.cfg, self.tokenizer
        content = hashlib.blake2b(digest_size=16)  # Over per-document digests, in source order.
        texts: list[str] = []
        in_val: list[bool] = []
        chars = 0
        pending: collections.deque = collections.deque()  # (future, position after its documents)
        progress, task = _progress(f"tokenizing ({tokenizer.name})", self.source.text_bytes)
        start, written, skipped = time.perf_counter(), 0, 0

        def write_ready(limit: int) -> None:
            nonlocal written
            while pending and (len(pending) > limit or pending[0][0].done()):
                future, position = pending.popleft()
                result = future.result()
                content.update(result["digests"])
                for s in SPLITS:
                    self.writers[s].write(result["tokens"][s], result["documents"][s], result["bytes"][s])
                self.commit(position=position)
                written += sum(len(t) for t in result["tokens"].values())
                progress.update(
                    task,
                    advance=sum(result["bytes"].values()),
                    tokens_per_s=tokens_per_s_text(written, time.perf_counter() - start),
                )

        def submit(position: int) -> None:
            nonlocal texts, in_val, chars
            pending.append(
                (
                    pool.submit(encode_chunk, tokenizer.name, self.dtype.name, texts, in_val),
                    position,
                )
            )
            texts, in_val, chars = [], [], 0
            write_ready(2 * max(workers, 1))

        pool = make_pool(pool_kind, workers)
        with progress, pool:
            index = 0  # Of the document in the train stream, for the hold-out.
            hold_out = None
            position = 0
            for position, (stream, text) in enumerate(sources.documents(self.source, cfg)):
                if hold_out is None:  # The source says whether it has its own split once started.
                    hold_out = cfg.val_fraction > 0 and not self.source.extra.get("own_val")
                if not text:
                    continue
                val = stream == "val" or (hold_out and _is_val_document(index, cfg.val_fraction))
                index += stream == "train"
                if position < self.resumed_from:  # Written before: only its digest is needed.
                    data = text.encode("utf-8")
                    content.update(hashlib.blake2b(data, digest_size=16).digest())
                    skipped += len(data)
                    if skipped >= CHUNK_CHARS or position + 1 == self.resumed_from:
                        progress.advance(task, skipped)
                        skipped = 0
                    continue
                texts.append(text)
                in_val.append(val)
                chars += len(text)
                if chars >= CHUNK_CHARS:
                    submit(position + 1)
            if texts:
                submit(position + 1)
            write_ready(0)
        return content.hexdigest()

    def _copy_tokens(self) -> str:
        """Copies a pre-tokenized file (and a ``val`` file beside a ``train`` one); returns the hash."""
        content = hashlib.blake2b(digest_size=16)
        for split, path in zip(SPLITS, self.source.files, strict=False):
            try:
                tokens = (
                    np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, np.uint16, "r")
                )
            except (ValueError, OSError, EOFError) as e:  # not a .npy file, odd or empty .bin
                raise GptjaxError(
                    f"cannot read token file {str(path)!r} ({e}): a .bin holds uint16 ids (an even, "
                    "non-zero number of bytes), a .npy a 1-D integer array written by numpy.save"
                ) from e
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise GptjaxError(
                    f"token file {str(path)!r} must hold a flat integer array, not {tokens.dtype}"
                )
            for start in range(0, len(tokens), 1 << 24):
                block = np.asarray(tokens[start : start + (1 << 24)])
                validate.token_ids(block, self.tokenizer.vocab_size, path)  # before any cast
                content.update(block.tobytes())
                documents = int((block == self.tokenizer.eot_id).sum())
                self.writers[split].write(block, documents, _text_bytes(self.tokenizer, block))
        return content.hexdigest()

    def _hold_out_tail(self) -> None:
        """Moves the last ``val_fraction`` of the training tokens into the (empty) validation split.

        Resumable: the copy is redone until recorded, then the training split is cut.
        """
        if self.record["stage"] == "done":
            return
        train, val = self.writers["train"], self.writers["val"]
        n = train.stats["tokens"]
        n_val = int(n * self.cfg.val_fraction)
        if self.record["stage"] == "streamed":
            val.truncate(0)
            source = store.ShardedTokens(
                [store.shard_path(self.folder, "train", i) for i in range(len(train.shard_lengths()))],
                train.shard_lengths(),
                self.dtype,
            )
            for begin in range(n - n_val, n, 1 << 24):
                block = np.array(source[begin : min(n, begin + (1 << 24))])
                val.write(block, 0, _text_bytes(self.tokenizer, block))
            self.commit(stage="tail-copied")
        train.truncate(n - n_val)
        train.stats.update(bytes=max(0, train.stats["bytes"] - val.stats["bytes"]), tokens=n - n_val)
        self.commit(stage="done")


def _text_bytes(tokenizer: Tokenizer, tokens: np.ndarray) -> int:
    """UTF-8 bytes of the text behind tokens, end-of-text excluded (pieces may shift a few)."""
    tokens = tokens[tokens != tokenizer.eot_id]
    if tokenizer.name == "bytes":
        return int((tokens < 256).sum())
    return len(tokenizer.decode(tokens.tolist()).encode("utf-8"))


# --------------------------------------------------------------------------------------
# Opening (and building) a store


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


def _locked_folder(root: Path, name: str) -> tuple[Path, int | None]:
    """The resumable ``.partial-<name>`` folder, locked; a private one if another builder holds it."""
    partial = root / f".partial-{name}"
    partial.mkdir(exist_ok=True)
    fd = os.open(partial, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return partial, fd
    except BlockingIOError:
        os.close(fd)
    private = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    private.mkdir()
    return private, None


def open_store(
    cfg: DataConfig, *, workers: int | None = None, pool: str = "process"
) -> tuple[Path, dict[str, Any], Tokenizer, bool]:
    """Builds the store unless a complete one exists; returns (folder, meta, tokenizer, built).

    Args:
        cfg: The source and its settings.
        workers: Tokenizing workers (default: one per core; 1 tokenizes on the calling thread).
        pool: ``process`` (default: 1.28x the cores x single-thread tiktoken rate on an idle
            2-core machine, against 0.61x for threads) or ``thread``.
    """
    tokenizer = get_tokenizer(cfg.tokenizer)
    source = sources.resolve(cfg)
    name = store_name(cfg, tokenizer, source)
    root = cache_dir(cfg)
    final = root / name
    if (final / "meta.json").is_file():
        return final, json.loads((final / "meta.json").read_text()), tokenizer, False
    if workers is None:
        small = source.text_bytes is not None and source.text_bytes < 4 * CHUNK_CHARS
        workers = 1 if tokenizer.name == "bytes" or small else os.cpu_count() or 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        validate.remove_dead_temporaries(root, f".tmp-{name}-")  # private folders of killed builds
        folder, lock = _locked_folder(root, name)
    except OSError as e:  # a full, read-only or non-directory cache directory
        raise validate.cache_error(root, e) from e
    try:
        if (final / "meta.json").is_file():  # Finished by another builder meanwhile.
            built = False
        elif (folder / "meta.json").is_file():  # Finished, then stopped before the rename.
            built = _publish(folder, final)
        else:
            start = time.perf_counter()
            build = _Build(cfg, tokenizer, source, folder)
            meta = build.run(workers, pool)
            meta["build_seconds"] = round(time.perf_counter() - start, 3)
            meta["resumed_from_document"] = build.resumed_from
            (folder / "progress.json").unlink(missing_ok=True)
            store.write_json(folder / "meta.json", meta)  # Last: marks it complete.
            built = _publish(folder, final)
    except GptjaxError:
        shutil.rmtree(folder, ignore_errors=True)  # Bad input: nothing worth resuming.
        raise
    except OSError as e:  # the cache filled up or became unwritable while building
        if lock is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise validate.cache_error(root, e) from e
    except BaseException:
        if lock is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    if folder.exists() and lock is not None and not built:
        shutil.rmtree(folder, ignore_errors=True)
    return final, json.loads((final / "meta.json").read_text()), tokenizer, built
