"""Batches: every training batch is a pure function of (seed, step); the eval pass is ordered.

*Training windows* are ``seq_len + 1`` tokens starting at ``offset_e + k * seq_len``: epoch
e visits every k once, in a permutation drawn (with its offset ``offset_e < seq_len``) from
``numpy.random.default_rng([seed, e])``. Batch ``step`` holds global positions
``step * global_batch ... + global_batch - 1`` of that endless sequence, so it is a pure
function of (seed, step), and process p of P reads rows ``[p * B/P, (p + 1) * B/P)``.

A *mixture* gives each global position to one source by a chain of balanced (Sturmian)
sequences: source 1 takes position n when ``floor((n + 1) w + phi) > floor(n w + phi)``, the
rest are numbered anew and split the same way among the remaining sources. Source i's
count among any N consecutive positions is therefore within a few rows of ``N * w_i``, and a
position's source and its index within that source's own window sequence are closed-form,
so mixture batches stay a pure function of (seed, step).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from gptjax.data.store import ShardedTokens
from gptjax.errors import GptjaxError


def _windows(tokens: Any, starts: np.ndarray, length: int) -> np.ndarray:
    if isinstance(tokens, ShardedTokens):
        return tokens.windows(starts, length, np.int32)
    return np.asarray(tokens[starts[:, None] + np.arange(length)], np.int32)


def _check_processes(global_batch: int, process_index: int, process_count: int) -> None:
    if global_batch % process_count or not 0 <= process_index < process_count:
        raise GptjaxError(
            f"global batch {global_batch} must divide evenly over {process_count} processes "
            f"(process index {process_index})"
        )


class _Batches:
    """What every batch stream shares: a global batch per step, sliced by process, prefetched."""

    global_batch: int
    process_index: int
    process_count: int

    def global_batch_at(self, step: int) -> np.ndarray:  # pragma: no cover (abstract)
        raise NotImplementedError

    def _rows(self, step: int, rows: slice) -> np.ndarray:  # pragma: no cover (abstract)
        raise NotImplementedError

    def batch(self, step: int) -> np.ndarray:
        """This process's rows of the global batch at ``step``: int32 ``[B / P, seq_len + 1]``."""
        rows = self.global_batch // self.process_count
        return self._rows(step, slice(self.process_index * rows, (self.process_index + 1) * rows))

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


class TrainBatches(_Batches):
    """Training batches as a pure function of (seed, step); see the module docstring.

    Args:
        tokens: The training split (an array or a store's ``ShardedTokens``).
        seq_len: Tokens per input sequence; rows hold ``seq_len + 1`` (inputs, shifted targets).
        global_batch: Rows per step summed over all processes.
        seed: The data seed.
        process_index: This process's index among ``process_count``.
        process_count: Processes that split each global batch by rows.
    """

    def __init__(
        self,
        tokens: Any,
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
        _check_processes(global_batch, process_index, process_count)
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

    def starts_at(self, positions: np.ndarray) -> np.ndarray:
        """Start offsets of the windows at global ``positions`` of the endless sequence."""
        epochs, index = np.divmod(positions, self.n_windows)  # A batch may straddle two epochs.
        result = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            result[mask] = self.epoch_starts(int(epoch))[index[mask]]
        return result

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch's rows at ``step``."""
        return self.starts_at(step * self.global_batch + np.arange(self.global_batch, dtype=np.int64))

    def _rows(self, step: int, rows: slice) -> np.ndarray:
        return _windows(self.tokens, self.starts(step)[rows], self.seq_len + 1)

    def global_batch_at(self, step: int) -> np.ndarray:
        """The whole global batch at ``step``: int32 ``[global_batch, seq_len + 1]``."""
        return self._rows(step, slice(None))


class MixtureBatches(_Batches):
    """Training batches drawn from several sources in fixed proportions; see the module docstring.

    Args:
        parts: ``(weight, tokens)`` per source; weights are normalised to sum to 1.
        seq_len, global_batch, seed, process_index, process_count: As for ``TrainBatches``.
    """

    def __init__(
        self,
        parts: list[tuple[float, Any]],
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        _check_processes(global_batch, process_index, process_count)
        weights = np.array([w for w, _ in parts], np.float64)
        if len(parts) < 1 or not (weights > 0).all():
            raise GptjaxError(f"mixture weights must be > 0, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        remaining = np.cumsum(self.weights[::-1])[::-1]  # Weight of sources i, i+1, ...
        self._relative = self.weights[:-1] / remaining[:-1]
        self._phases = np.random.default_rng([seed, len(parts)]).random(len(parts))
        self.streams = [
            TrainBatches(tokens, seq_len=seq_len, global_batch=1, seed=seed * 1009 + i)
            for i, (_, tokens) in enumerate(parts)
        ]
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.process_index, self.process_count = process_index, process_count

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(source, index within that source's windows)`` of global ``positions``."""
        n = np.asarray(positions, np.int64)
        source = np.full(len(n), len(self.streams) - 1)
        local = n.copy()
        open_ = np.ones(len(n), bool)
        for i, (w, phase) in enumerate(zip(self._relative, self._phases, strict=False)):
            before = np.floor(n * w + phase).astype(np.int64)  # Source i's count among the first n.
            taken = open_ & (np.floor((n + 1) * w + phase).astype(np.int64) > before)
            source[taken], local[taken] = i, before[taken]
            n = np.where(open_ & ~taken, n - before, n)  # Numbered anew among the rest.
            open_ &= ~taken
        local[open_] = n[open_]
        return source, local

    def sources(self, step: int) -> np.ndarray:
        """The source index of each row of the global batch at ``step``."""
        return self.assign(step * self.global_batch + np.arange(self.global_batch, dtype=np.int64))[0]

    def _rows(self, step: int, rows: slice) -> np.ndarray:
        positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        source, local = (a[rows] for a in self.assign(positions))
        result = np.empty((len(source), self.seq_len + 1), np.int32)
        for i in np.unique(source):
            mask = source == i
            stream = self.streams[i]
            result[mask] = _windows(stream.tokens, stream.starts_at(local[mask]), self.seq_len + 1)
        return result

    def global_batch_at(self, step: int) -> np.ndarray:
        """The whole global batch at ``step``: int32 ``[global_batch, seq_len + 1]``."""
        return self._rows(step, slice(None))


def eval_batches(
    tokens: Any,
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
