"""Tokenizers behind one small interface: tiktoken encodings and a byte-level tokenizer.

Every tiktoken call in gptjax lives in this file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from gptjax.errors import GptjaxError

TIKTOKEN_ENCODINGS = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
_TIKTOKEN_VOCAB = {
    "gpt2": 50257,
    "r50k_base": 50257,
    "p50k_base": 50281,
    "cl100k_base": 100277,
    "o200k_base": 200019,
}


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def decode(self, tokens: Sequence[int]) -> str: ...
    def save_hf(self, directory: str | Path, model_max_length: int) -> list[Path]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus end-of-text as 256. Needs no files."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def decode(self, tokens: Sequence[int]) -> str:
        # End-of-text (and anything outside a byte) is dropped; broken UTF-8 is replaced.
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")

    def save_hf(self, directory: str | Path, model_max_length: int) -> list[Path]:
        """GPT-2's vocab files with the 256 bytes and no merges (see :func:`_write_gpt2_files`)."""
        vocab = {bytes([b]): b for b in range(256)}
        return _write_gpt2_files(directory, vocab, [], "<|endoftext|>", self.eot_id, model_max_length)


class TiktokenTokenizer:
    """A tiktoken encoding; batch encoding runs on several threads (tiktoken releases the GIL)."""

    def __init__(self, name: str):
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding(name)
        except Exception as e:  # network errors come in many types; all mean the same here
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
            raise GptjaxError(
                f"tiktoken could not load the {name!r} vocabulary ({type(e).__name__}); offline, "
                f"set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files"
                + (f" (it is {cache!r} now)" if cache else "")
            ) from e
        self.name = name
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encodes on ``num_threads`` threads (default: one per core)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as a uint32 array, built in Rust without the GIL (no Python list in between)."""
        return self._enc.encode_to_numpy(text, disallowed_special=())  # Specials as plain text: ordinary.

    def decode(self, tokens: Sequence[int]) -> str:
        return self._enc.decode([t for t in tokens if 0 <= t < self.vocab_size], errors="replace")

    def save_hf(self, directory: str | Path, model_max_length: int) -> list[Path]:
        """GPT-2's vocab files for this encoding (see :func:`_write_gpt2_files`); [] for one
        they cannot express (only ``gpt2`` and ``r50k_base`` use GPT-2's pre-tokenizer).

        tiktoken keeps only each token's rank; the merges are recovered by re-running BPE
        on each token's bytes with the lower ranks, which must end in exactly two parts.
        For ``gpt2`` this reproduces OpenAI's ``encoder.json`` and ``vocab.bpe`` exactly.
        """
        if self.name not in ("gpt2", "r50k_base"):
            return []
        ranks: dict[bytes, int] = self._enc._mergeable_ranks  # no public accessor in tiktoken
        merges = []
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            if len(token) > 1:
                parts = _bpe(token, ranks, below=rank)
                if len(parts) != 2:
                    raise GptjaxError(f"{self.name}: token {rank} is not one merge of lower ranks")
                merges.append((parts[0], parts[1]))
        return _write_gpt2_files(
            directory, ranks, merges, self._enc.decode([self.eot_id]), self.eot_id, model_max_length
        )


def _write_gpt2_files(directory, vocab: dict[bytes, int], merges, eot: str, eot_id: int, max_length: int):
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` in GPT-2's format,
    which ``transformers.GPT2TokenizerFast.from_pretrained(directory)`` reads; returns them."""
    char = _byte_chars()
    text = {token: "".join(char[b] for b in token) for token in vocab}
    files = {
        "vocab.json": json.dumps({text[t]: i for t, i in vocab.items()} | {eot: eot_id}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{text[a]} {text[b]}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": max_length,
                "add_prefix_space": False,
                "bos_token": eot,
                "eos_token": eot,
                "unk_token": eot,
            },
            indent=2,
        ),
    }
    directory = Path(directory)
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")
    return [directory / name for name in files]


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte in its vocab files: printable Latin-1 bytes
    stand for themselves, the other 68 for the code points from 256 up, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def _bpe(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Byte-pair-encode ``token`` using only merges ranked below ``below``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(a + b, below), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank >= below:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def known_vocab_size(name: str) -> int | None:
    """The vocabulary size of a tokenizer name without loading it (None if unknown)."""
    if name == "bytes":
        return ByteTokenizer.vocab_size
    return _TIKTOKEN_VOCAB.get(name)


def get_tokenizer(name: str) -> Tokenizer:
    """``bytes`` or a tiktoken encoding name."""
    if name == "bytes":
        return ByteTokenizer()
    if name in TIKTOKEN_ENCODINGS:
        return TiktokenTokenizer(name)
    raise GptjaxError(f"unknown tokenizer {name!r}: use 'bytes' or one of {list(TIKTOKEN_ENCODINGS)}")
