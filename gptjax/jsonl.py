"""Reading JSONL: one owner for line numbers, blank lines and the errors that name a line.

The corpus reader (:mod:`gptjax.data.sources`), fine-tuning's task files and ``gptjax
eval``'s multiple-choice files all read through :func:`parse` (:func:`records` for a path).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from gptjax.errors import GptjaxError


def parse(lines: Iterable[str], name: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line.

    A line that is not JSON, or not a JSON object, is a one-line error naming ``name`` (the
    file) and the line.
    """
    for line_num, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"line {line_num} of {name}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptjaxError(f"{where} is not valid JSON ({e.msg}): fix or remove the line") from None
        if not isinstance(record, dict):
            raise GptjaxError(f"{where} is a JSON {type(record).__name__}, not an object")
        yield line_num, record


def records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """:func:`parse` of a ``.jsonl`` file, plain or ``.gz``/``.zst`` compressed."""
    with open_text(path) as f:
        yield from parse(f, repr(str(path)))


def open_text(path: str | Path) -> io.TextIOBase:
    """A text file, plain or ``.gz``/``.zst`` compressed, as UTF-8 text (zstd needs ``zstandard``)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 (closed with the wrapper)
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        except zstandard.ZstdError as e:
            raw.close()
            raise OSError(f"not a zstd file: {e}") from e
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, encoding="utf-8")
