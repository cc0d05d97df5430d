"""Tokenizers behind one small interface: tiktoken encodings and a byte-level tokenizer.

Every tiktoken call in gptjax lives in this file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

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
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, tokens: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus end-of-text as 256. Needs no files."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, tokens: Sequence[int]) -> str:
        # End-of-text (and anything outside a byte) is dropped; broken UTF-8 is replaced.
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


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

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, tokens: Sequence[int]) -> str:
        return self._enc.decode([t for t in tokens if 0 <= t < self.vocab_size], errors="replace")


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
