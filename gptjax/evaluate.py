"""Measuring a model beyond its training loss.

* :func:`lm_metrics`: a full pass over a data source's split: mean token NLL (nats),
  perplexity ``exp(NLL)`` and bits per byte ``total NLL / (ln 2 * UTF-8 bytes)``, which
  does not depend on the tokenizer, so models with different tokenizers compare.
* :func:`score_multiple_choice`: zero- or few-shot multiple choice (LAMBADA / HellaSwag
  style) by the log-likelihood of each continuation ``" " + choice`` after the context,
  raw and normalised by the continuation's UTF-8 bytes (lm-evaluation-harness's
  ``acc_norm``), with K in-context examples ``"context choice\\n\\n"`` drawn per question
  by a seeded generator from a separate split. Accuracy comes with its standard error
  ``sqrt(p (1 - p) / n)``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import data as data_lib
from gptjax import jsonl
from gptjax.config import DataConfig
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.steps import make_eval_step

SPLITS = ("val", "train", "all")


def lm_metrics(
    model: GPT, data_config: DataConfig, *, split: str = "val", batch_size: int = 8, max_batches: int = 0
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of ``model`` over one split of a data source.

    Args:
        model: The model; its block_size is the window length.
        data_config: The source and tokenizer (the model's own tokenizer).
        split: ``val`` (the held-out split), ``train``, or ``all`` (both).
        batch_size: Windows per forward pass.
        max_batches: Stop after this many batches per split (0: the full pass; bits per
            byte then counts only the bytes of the tokens seen, pro rata).

    Returns:
        ``loss`` (mean NLL per predicted token, nats), ``perplexity``, ``bits_per_byte``,
        ``tokens`` (predicted tokens) and ``bytes``.
    """
    if split not in SPLITS:
        raise GptjaxError(f"split {split!r} must be one of {list(SPLITS)}")
    cfg = model.config
    dataset = data_lib.load_dataset(data_config, seq_len=cfg.block_size, vocab_size=cfg.vocab_size)
    graphdef, params = nnx.split(model)
    eval_step = jax.jit(make_eval_step(graphdef))
    total = count = n_bytes = 0.0
    for name in ("val", "train") if split == "all" else (split,):
        tokens = getattr(dataset, name)
        if len(tokens) < 2:
            raise GptjaxError(f"the {name} split of {data_config.source!r} is empty: use split=train or all")
        split_nll, split_count = nll_sum(
            eval_step, params, tokens, seq_len=cfg.block_size, batch_size=batch_size, max_batches=max_batches
        )
        total, count = total + split_nll, count + split_count
        n_bytes += dataset.meta["bytes"][name] * min(1.0, split_count / (len(tokens) - 1))
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "bits_per_byte": total / (math.log(2) * n_bytes),
        "tokens": int(count),
        "bytes": int(round(n_bytes)),
    }


def nll_sum(eval_step, params, tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int = 0,
            mesh: jax.sharding.Mesh | None = None) -> tuple[float, float]:  # fmt: skip
    """The summed NLL and the count of predicted tokens over ``tokens``' eval windows.

    The one evaluation loop: training's validation (on ``mesh``, every process its rows)
    and :func:`lm_metrics` (one process) both run it.
    """
    from gptjax import sharding

    procs = {"process_index": jax.process_index(), "process_count": jax.process_count()} if mesh else {}
    place = (lambda x: sharding.global_batch(x, mesh)) if mesh else jnp.asarray
    total = count = 0.0
    for batch, weights in data_lib.eval_batches(
        tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches, **procs
    ):
        nll, n = eval_step(params, place(batch), place(weights))
        total, count = total + float(nll), count + float(n)
    return total, count


# --------------------------------------------------------------------------------------
# Multiple choice


def read_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """``{context, choices, label}`` rows of a JSONL file; ``label`` is an index or a choice."""
    path = Path(path)
    if not path.is_file():
        raise GptjaxError(
            f"task file {str(path)!r} does not exist: give a JSONL of {{context, choices, label}}"
        )
    rows = []
    for line_num, record in jsonl.records(path):
        where = f"{path.name} line {line_num}"
        missing = [k for k in ("context", "choices", "label") if k not in record]
        if missing:
            raise GptjaxError(f"{where} has no {missing[0]!r} field: rows are {{context, choices, label}}")
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise GptjaxError(f"{where}: choices must be a list of at least 2 strings")
        label = record["label"]
        if isinstance(label, str) and label in choices:
            label = choices.index(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise GptjaxError(
                f"{where}: label {label!r} is neither a choice nor an index below {len(choices)}"
            )
        rows.append({"context": str(record["context"]), "choices": [str(c) for c in choices], "label": label,
                     "where": where})  # fmt: skip
    if not rows:
        raise GptjaxError(f"task file {str(path)!r} has no rows")
    return rows


def few_shot_prefix(pool: list[dict], shots: int, index: int, seed: int = 0) -> str:
    """The in-context examples of question ``index``: ``shots`` rows of ``pool``, drawn by
    ``numpy.random.default_rng([seed, index])`` without replacement, each as
    ``"context right_choice\\n\\n"``."""
    if shots == 0:
        return ""
    if shots > len(pool):
        raise GptjaxError(f"--shots {shots} is more than the {len(pool)} rows of the few-shot split")
    picks = np.random.default_rng([seed, index]).choice(len(pool), shots, replace=False)
    return "".join(f"{pool[i]['context']} {pool[i]['choices'][pool[i]['label']]}\n\n" for i in picks)


def _sequences(rows, tokenizer, block_size, shots, pool, seed):
    """Token sequences (one per row and choice), where each continuation starts, its bytes."""
    seqs, starts, n_bytes, owner = [], [], [], []
    for i, row in enumerate(rows):
        context = tokenizer.encode(few_shot_prefix(pool, shots, i, seed) + row["context"])
        context = context or [tokenizer.eot_id]  # the first token needs something to condition on
        for choice in row["choices"]:
            continuation = tokenizer.encode(" " + choice)
            if len(continuation) >= block_size:
                raise GptjaxError(
                    f"{row['where']}: a choice of {len(continuation)} tokens does not fit the context "
                    f"({block_size}): shorten it"
                )
            seq = (context + continuation)[-(block_size + 1) :]  # keep the end: drop the oldest context
            seqs.append(seq)
            starts.append(len(seq) - len(continuation))
            n_bytes.append(len((" " + choice).encode("utf-8")))
            owner.append(i)
    return seqs, np.asarray(starts), np.asarray(n_bytes, np.float64), np.asarray(owner)


def continuation_logprobs(model: GPT, seqs: list[list[int]], starts: np.ndarray, batch_size: int = 16):
    """``sum log P(seq[j] | seq[:j])`` over ``j >= starts[i]`` for each sequence."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def score(params, tokens, mask):  # tokens (B, T+1), mask (B, T)
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, -1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]  # (B, T)
        return (picked * mask).sum(-1)

    width = max(len(s) for s in seqs)
    out = np.zeros(len(seqs))
    for lo in range(0, len(seqs), batch_size):
        chunk = list(range(lo, min(lo + batch_size, len(seqs))))
        chunk += [chunk[0]] * (batch_size - len(chunk))  # a fixed shape: one compilation
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width - 1), np.float32)
        for r, i in enumerate(chunk):
            tokens[r, : len(seqs[i])] = seqs[i]
            mask[r, starts[i] - 1 : len(seqs[i]) - 1] = 1.0  # predictions of the continuation
        scores = np.asarray(score(params, jnp.asarray(tokens), jnp.asarray(mask)))
        n = min(batch_size, len(seqs) - lo)
        out[lo : lo + n] = scores[:n]
    return out


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def score_multiple_choice(
    model: GPT,
    tokenizer,
    rows: list[dict],
    *,
    shots: int = 0,
    shot_pool: list[dict] | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy of picking the most likely continuation (raw and per byte), with standard errors.

    Args:
        rows: Questions from :func:`read_multiple_choice`.
        shots: In-context examples per question (0: zero-shot).
        shot_pool: The split the examples come from (never ``rows`` itself).
        seed: Seeds the draw of the in-context examples.
    """
    if shots and shot_pool is None:
        raise GptjaxError(f"--shots {shots} needs --shots-from FILE: the split in-context examples come from")
    if shot_pool is not None and shot_pool is rows:
        raise GptjaxError("the few-shot split must differ from the evaluated split")
    seqs, starts, n_bytes, owner = _sequences(
        rows, tokenizer, model.config.block_size, shots, shot_pool, seed
    )
    logprobs = continuation_logprobs(model, seqs, starts, batch_size)
    raw, norm = [], []
    for i, row in enumerate(rows):
        these = owner == i
        raw.append(int(np.argmax(logprobs[these])) == row["label"])
        norm.append(int(np.argmax(logprobs[these] / n_bytes[these])) == row["label"])
    n = len(rows)
    acc, acc_norm = float(np.mean(raw)), float(np.mean(norm))
    return {
        "n": n,
        "shots": shots,
        "accuracy": acc,
        "accuracy_stderr": _stderr(acc, n),
        "accuracy_norm": acc_norm,
        "accuracy_norm_stderr": _stderr(acc_norm, n),
        "chance": float(np.mean([1 / len(r["choices"]) for r in rows])),
    }


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str = "",
    split: str = "val",
    task: str = "",
    shots: int = 0,
    shots_from: str = "",
    seed: int = 0,
    batch_size: int = 8,
    max_batches: int = 0,
) -> dict[str, Any]:
    """What ``gptjax eval`` prints: LM metrics (on ``data``, default the run's own source,
    when no task is given or ``data`` is set) and multiple-choice scores for ``task``."""
    from gptjax.runs import load
    from gptjax.validate import at_least

    at_least(batch_size=(batch_size, 1), shots=(shots, 0), max_batches=(max_batches, 0))
    model, config, tokenizer = load(run_dir)
    result: dict[str, Any] = {"run_dir": str(run_dir)}
    if data or not task:
        data_config = dataclasses.replace(
            config.data, source=data or config.data.source, tokenizer=tokenizer.name
        )
        result["lm"] = {"source": data_config.source, "split": split,
                        **lm_metrics(model, data_config, split=split, batch_size=batch_size,
                                     max_batches=max_batches)}  # fmt: skip
    if task:
        pool = read_multiple_choice(shots_from) if shots_from else None
        scores = score_multiple_choice(
            model, tokenizer, read_multiple_choice(task), shots=shots, shot_pool=pool, seed=seed
        )
        result["multiple_choice"] = {"task": task, **scores}
    return result
