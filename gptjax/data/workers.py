"""The tokenizing pool: the workers that turn chunks of documents into tokens, per split."""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import threading
import time
from functools import lru_cache
from typing import Any

import numpy as np

from gptjax.data.store import SPLITS
from gptjax.tokenizer import Tokenizer, get_tokenizer


@lru_cache(maxsize=4)
def _tokenizer(name: str) -> Tokenizer:
    return get_tokenizer(name)


def encode_chunk(tokenizer_name: str, dtype: str, texts: list[str], in_val: list[bool]) -> dict[str, Any]:
    """Each document's tokens followed by end-of-text, per split, with its text's digest."""
    tokenizer = _tokenizer(tokenizer_name)
    eot = np.array([tokenizer.eot_id], np.uint32)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    n_bytes, n_docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    digests = bytearray()
    for text, val in zip(texts, in_val, strict=True):
        data = text.encode("utf-8")
        digests += hashlib.blake2b(data, digest_size=16).digest()
        ids = np.frombuffer(data, np.uint8) if tokenizer.name == "bytes" else tokenizer.encode_array(text)
        split = "val" if val else "train"
        parts[split] += [ids, eot]
        n_bytes[split] += len(data)
        n_docs[split] += 1
    tokens = {s: np.concatenate(p).astype(dtype) if p else np.zeros(0, dtype) for s, p in parts.items()}
    return {"tokens": tokens, "bytes": n_bytes, "documents": n_docs, "digests": bytes(digests)}


def make_pool(kind: str, workers: int) -> concurrent.futures.Executor:
    """``workers`` processes or threads (``kind``); with one worker, jobs run at submission."""
    if workers <= 1:
        return _InlinePool()
    if kind == "thread":
        return concurrent.futures.ThreadPoolExecutor(workers)
    # forkserver: workers never fork a process whose JAX runtime holds threads; the server
    # imports this module once, and each worker is forked from it.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_leave_with, initargs=(os.getpid(),)
    )


def _leave_with(builder: int) -> None:
    """A worker's initializer: exit once the builder is gone (a killed builder cannot shut the
    pool down, and a worker blocked on its job queue would otherwise wait forever)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(builder, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name="gptjax-watch-builder", daemon=True).start()


class _InlinePool(concurrent.futures.Executor):
    """Runs each job at submission: small corpora and the byte tokenizer need no pool."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future
