"""Reading JSONL: one owner for line numbers, blank lines and the errors that name a line.

Fine-tuning's task files and ``gptjax eval``'s multiple-choice files read through
:func:`records`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from gptjax.errors import GptjaxError


def records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a ``.jsonl`` file.

    A line that is not JSON, or not a JSON object, is a one-line error naming the file and line.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for line_num, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {line_num}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptjaxError(f"{where} is not valid JSON ({e.msg}): fix or remove the line") from None
            if not isinstance(record, dict):
                raise GptjaxError(f"{where} is a JSON {type(record).__name__}, not an object")
            yield line_num, record
