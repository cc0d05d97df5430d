"""Fine-tuning data: CSV/JSONL rows with named columns, framed as GPT-1 token sequences.

Every error names the file and the line of the offending row, and says what to do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gptjax import jsonl
from gptjax.errors import GptjaxError


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each row of a ``.csv`` (with a header) or ``.jsonl`` file."""
    if not path.is_file():
        raise GptjaxError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for record in reader:
                yield reader.line_num, record
    elif path.suffix == ".jsonl":
        yield from jsonl.records(path)
    else:
        raise GptjaxError(f"data file {str(path)!r} must end in .csv or .jsonl")


def _columns(cfg) -> dict[str, str]:
    if cfg.task == "classification":
        return {"text": cfg.text_column}
    if cfg.task == "multiple_choice":
        return {"text": cfg.text_column, "choices": cfg.choices_column}
    return {"text_a": cfg.text_a_column, "text_b": cfg.text_b_column}


def read_examples(path: str | Path, cfg) -> list[dict[str, Any]]:
    """The rows of a task file as ``{"where", <role>: value..., "label"}`` dicts.

    Roles follow the task: ``text``; ``text_a`` and ``text_b``; or ``text`` (the context)
    and ``choices`` (a list; in a CSV cell, a JSON list).
    """
    path = Path(path)
    wanted = {**_columns(cfg), "label": cfg.label_column}
    examples = []
    for line, record in _rows(path):
        where = f"{path.name} line {line}"
        missing = [c for c in wanted.values() if c not in record or record[c] is None]
        if missing:
            raise GptjaxError(
                f"{where} has no column {missing[0]!r} (it has {sorted(record)}): "
                f"rename the column or set {cfg.task} column fields (e.g. label_column=...)"
            )
        example = {role: record[column] for role, column in wanted.items()}
        example["where"] = where
        if "choices" in example:
            choices = example["choices"]
            if isinstance(choices, str):
                try:
                    choices = json.loads(choices)
                except json.JSONDecodeError:
                    raise GptjaxError(f"{where}: choices must be a JSON list of strings") from None
            if not isinstance(choices, list) or len(choices) < 2:
                raise GptjaxError(f"{where}: a multiple-choice row needs a list of at least 2 choices")
            example["choices"] = [str(c) for c in choices]
        examples.append(example)
    if not examples:
        raise GptjaxError(f"data file {str(path)!r} has no rows")
    return examples


def label_names(examples: list[dict], cfg) -> list[str]:
    """The sorted label names of the training rows (numeric order if all are integers).

    Multiple choice has none: its label is the index (or the text) of the right choice.
    """
    if cfg.task == "multiple_choice":
        return []
    names = sorted({str(e["label"]) for e in examples})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    if len(names) < 2:
        raise GptjaxError(f"the training file has a single label {names}: a classifier needs at least 2")
    return names


def _label_id(example: dict, names: list[str]) -> int:
    label = example["label"]
    if "choices" in example:
        choices = example["choices"]
        if isinstance(label, str) and label in choices:
            return choices.index(label)
        try:
            index = int(label)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(choices):
            raise GptjaxError(
                f"{example['where']}: label {label!r} is neither a choice nor an index below {len(choices)}"
            )
        return index
    if str(label) not in names:
        raise GptjaxError(
            f"{example['where']}: unknown label {label!r}; the training labels are {names}: "
            "fix the row or add the label to the training file"
        )
    return names.index(str(label))


def sequences(example: dict, task: str, tokenizer, special: dict[str, int]) -> list[list[int]]:
    """The GPT-1 framings of one example (one sequence, two for similarity, one per choice)."""
    s, d, e = special["start"], special["delim"], special["extract"]
    enc = tokenizer.encode
    if task == "classification":
        return [[s, *enc(str(example["text"])), e]]
    if task == "multiple_choice":
        context = enc(str(example["text"]))
        return [[s, *context, d, *enc(choice), e] for choice in example["choices"]]
    a, b = enc(str(example["text_a"])), enc(str(example["text_b"]))
    if task == "entailment":
        return [[s, *a, d, *b, e]]
    return [[s, *a, d, *b, e], [s, *b, d, *a, e]]  # similarity: both orders


def encode(examples: list[dict], cfg, tokenizer, special: dict, names: list[str], max_len: int) -> dict:
    """Arrays for a list of examples: tokens (N, K, T), lengths (N, K), valid (N, K), labels (N,).

    Sequences are right-padded with 0 (causal attention never looks right of the extract
    token); multiple-choice rows with fewer choices than the widest are padded with
    invalid choices.
    """
    seqs, labels = [], []
    for example in examples:
        framed = sequences(example, cfg.task, tokenizer, special)
        longest = max(len(x) for x in framed)
        if longest > max_len:
            raise GptjaxError(
                f"{example['where']}: the framed sequence has {longest} tokens, more than the context "
                f"({max_len}): shorten the row or fine-tune a model with a larger block_size"
            )
        seqs.append(framed)
        labels.append(_label_id(example, names))
    n, k, t = len(seqs), max(len(x) for x in seqs), max(len(s) for x in seqs for s in x)
    tokens = np.zeros((n, k, t), np.int32)
    lengths = np.ones((n, k), np.int32)
    valid = np.zeros((n, k), bool)
    for i, framed in enumerate(seqs):
        for j, seq in enumerate(framed):
            tokens[i, j, : len(seq)] = seq
            lengths[i, j], valid[i, j] = len(seq), True
    return {"tokens": tokens, "lengths": lengths, "valid": valid, "labels": np.asarray(labels, np.int32)}


def pad_to(arrays: dict, seq_len: int) -> dict:
    """The arrays with tokens right-padded to ``seq_len``."""
    tokens = arrays["tokens"]
    if tokens.shape[-1] > seq_len:
        raise GptjaxError(f"examples of {tokens.shape[-1]} tokens do not fit the run's {seq_len}")
    pad = np.zeros((*tokens.shape[:-1], seq_len - tokens.shape[-1]), np.int32)
    return {**arrays, "tokens": np.concatenate([tokens, pad], -1)}


def pad_choices(arrays: dict, k: int) -> dict:
    """The arrays with the choice axis padded to ``k`` invalid choices."""
    extra = k - arrays["tokens"].shape[1]
    if extra <= 0:
        return arrays
    widen = lambda a: np.concatenate([a, np.zeros((a.shape[0], extra, *a.shape[2:]), a.dtype)], 1)
    lengths = np.concatenate([arrays["lengths"], np.ones((len(arrays["lengths"]), extra), np.int32)], 1)
    return {**arrays, "tokens": widen(arrays["tokens"]), "valid": widen(arrays["valid"]), "lengths": lengths}


def batches(arrays: dict, indices: np.ndarray, batch_size: int, pad: bool = False) -> Iterator[dict]:
    """Batches of the rows ``indices``; ``pad`` fills the last one with weight-0 copies of row 0."""
    for lo in range(0, len(indices), batch_size):
        rows = indices[lo : lo + batch_size]
        if len(rows) < batch_size and not pad:
            return
        weight = np.zeros(batch_size, np.float32)
        weight[: len(rows)] = 1.0
        rows = np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)])
        yield {**{k: jnp.asarray(v[rows]) for k, v in arrays.items()}, "weight": jnp.asarray(weight)}
