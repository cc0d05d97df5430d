"""The token store on disk: each split in shards of a fixed number of tokens, one index.

A store folder holds ``{split}-{i:05d}.bin`` files (flat uint16, or uint32 when the
vocabulary needs it; every shard but a split's last holds exactly ``shard_tokens`` tokens)
and ``meta.json``, the index: dtype, ``shard_tokens`` and per split the shards' lengths, with
the statistics of what went in. Writers append to one open shard at a time and hold no
tokens beyond the block being written; readers memory-map a shard when a read first touches
it, so opening a store of any size costs nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.errors import GptjaxError

SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard: few files, each far below any file-size limit.


def shard_path(folder: Path, split: str, index: int) -> Path:
    return folder / f"{split}-{index:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_json(path: Path, value: Any) -> None:
    """Writes ``path`` whole or not at all (a reader never sees half a file)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


class ShardWriter:
    """Appends one split's tokens to its shards and counts what went in.

    Args:
        folder: The store being built.
        split: ``train`` or ``val``.
        dtype: The store's token dtype.
        shard_tokens: Tokens per shard.
        vocab_size: Token ids must lie in ``[0, vocab_size)``.
        what: The tokenizer's name, for the error message.
        stats: Counts from a resumed build; the shards are cut back to ``stats['tokens']``,
            dropping whatever was written after that state was recorded.
    """

    def __init__(
        self,
        folder: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        vocab_size: int,
        what: str,
        stats: dict[str, int] | None = None,
    ):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.vocab_size, self.what = vocab_size, what
        self.stats = dict(stats or {"documents": 0, "bytes": 0, "tokens": 0, "max_token_id": -1})
        self._file = None
        self.truncate(self.stats["tokens"])

    def truncate(self, n_tokens: int) -> None:
        """Cuts the split back to its first ``n_tokens`` (the statistics are the caller's)."""
        self.close()
        full, rest = divmod(n_tokens, self.shard_tokens)
        keep = full + (rest > 0)
        for path in self.folder.glob(f"{self.split}-*.bin"):
            if int(path.stem.rsplit("-", 1)[1]) >= keep:
                path.unlink()
        for index in range(keep):
            length = self.shard_tokens if index < full else rest
            path = shard_path(self.folder, self.split, index)
            if not path.is_file() or path.stat().st_size < length * self.dtype.itemsize:
                raise GptjaxError(f"{str(path)!r} is shorter than its recorded length: delete {self.folder}")
            os.truncate(path, length * self.dtype.itemsize)
        self.stats["tokens"] = n_tokens

    def write(self, tokens: np.ndarray, documents: int = 0, n_bytes: int = 0) -> None:
        """Appends ``tokens`` (ids checked against the vocabulary), crossing into new shards."""
        largest = int(tokens.max()) if len(tokens) else -1
        if largest >= self.vocab_size or (len(tokens) and int(tokens.min()) < 0):
            bad = largest if largest >= self.vocab_size else int(tokens.min())
            raise GptjaxError(
                f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) of tokenizer "
                f"{self.what!r}: set data.tokenizer to the one that wrote the tokens"
            )
        tokens = tokens.astype(self.dtype, copy=False)
        stats = self.stats
        done = 0
        while done < len(tokens):
            index, used = divmod(stats["tokens"], self.shard_tokens)
            if self._file is None:
                self._file = open(shard_path(self.folder, self.split, index), "ab")  # noqa: SIM115
            piece = tokens[done : done + self.shard_tokens - used]
            self._file.write(piece.tobytes())
            done += len(piece)
            stats["tokens"] += len(piece)
            if stats["tokens"] % self.shard_tokens == 0:
                self.close()  # Full: the next write opens the next shard.
        stats["documents"] += documents
        stats["bytes"] += n_bytes
        stats["max_token_id"] = max(stats["max_token_id"], largest)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def shard_lengths(self) -> list[int]:
        full, rest = divmod(self.stats["tokens"], self.shard_tokens)
        return [self.shard_tokens] * full + ([rest] if rest else [])


class ShardedTokens:
    """A split's tokens across shard files, read like one flat read-only array.

    Supports ``len``, integer and slice indexing, integer-array indexing of any shape, and
    ``windows(starts, length)``; each shard is memory-mapped when a read first touches it.

    Args:
        paths: The shard files in order.
        lengths: Tokens in each.
        dtype: Their dtype.
    """

    def __init__(self, paths: list[Path], lengths: list[int], dtype: np.dtype | str):
        self.paths, self.lengths, self.dtype = list(paths), list(lengths), np.dtype(dtype)
        self.ends = np.cumsum(np.asarray(self.lengths, np.int64))
        self.starts = self.ends - np.asarray(self.lengths, np.int64)
        self.maps: dict[int, np.ndarray] = {}

    @classmethod
    def concatenate(cls, parts: list[ShardedTokens]) -> ShardedTokens:
        """One array over several (a mixture's validation sets, end to end)."""
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            raise GptjaxError(f"cannot join token stores of dtypes {sorted(map(str, dtypes))}")
        paths = [path for p in parts for path in p.paths]
        return cls(paths, [n for p in parts for n in p.lengths], parts[0].dtype if parts else np.uint16)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def shard(self, index: int) -> np.ndarray:
        if index not in self.maps:
            self.maps[index] = np.memmap(self.paths[index], self.dtype, "r", shape=(self.lengths[index],))
        return self.maps[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : len(self)]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"index {int(key)} is out of bounds for {len(self)} tokens")
            shard = int(np.searchsorted(self.ends, index, side="right"))
            return self.shard(shard)[index - self.starts[shard]]
        return self._gather(np.asarray(key, np.int64))

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.ends, start, side="right"))
        if first < len(self.ends) and stop <= self.ends[first]:  # Within one shard: a view.
            return self.shard(first)[start - self.starts[first] : stop - self.starts[first]]
        pieces = []
        for index in range(first, len(self.ends)):
            if self.starts[index] >= stop:
                break
            lo, hi = max(start, self.starts[index]), min(stop, self.ends[index])
            pieces.append(self.shard(index)[lo - self.starts[index] : hi - self.starts[index]])
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        if len(self.lengths) == 1:
            return self.shard(0)[index]
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of bounds for {len(self)} tokens")
        shard = np.searchsorted(self.ends, index, side="right")
        result = np.empty(index.shape, self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            result[mask] = self.shard(int(s))[index[mask] - self.starts[s]]
        return result

    def windows(self, starts: np.ndarray, length: int, dtype: np.dtype | type | None = None) -> np.ndarray:
        """Rows ``tokens[start : start + length]`` for each start: ``[len(starts), length]``.

        One contiguous copy per row (faster than a fancy-index gather over one file, and the
        same cost whichever shard a row lies in); ``dtype`` converts during the copy.
        """
        result = np.empty((len(starts), length), dtype or self.dtype)
        shard_of = np.searchsorted(self.ends, starts, side="right").tolist()
        shard_starts, shard_ends = self.starts.tolist(), self.ends.tolist()
        for row, (start, s) in enumerate(zip(np.asarray(starts).tolist(), shard_of, strict=True)):
            if s < len(shard_ends) and start + length <= shard_ends[s]:
                local = start - shard_starts[s]
                result[row] = (self.maps.get(s) if s in self.maps else self.shard(s))[local : local + length]
            else:  # Across a shard boundary (or out of range: _range raises below).
                piece = self._range(start, start + length)
                if len(piece) != length:
                    raise IndexError(
                        f"window [{start}, {start + length}) is out of bounds for {len(self)} tokens"
                    )
                result[row] = piece
        return result


def open_split(folder: Path, meta: dict[str, Any], split: str) -> ShardedTokens:
    lengths = meta["shards"][split]
    paths = [shard_path(folder, split, i) for i in range(len(lengths))]
    return ShardedTokens(paths, lengths, meta["dtype"])
