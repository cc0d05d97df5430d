"""Opening token stores for a model: one source, or a weighted mixture of several."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptjax.config import DataConfig, parse_mixture
from gptjax.data import store
from gptjax.data.batches import MixtureBatches, TrainBatches
from gptjax.data.build import open_store
from gptjax.data.store import SPLITS
from gptjax.errors import GptjaxError
from gptjax.tokenizer import Tokenizer


@dataclass(frozen=True)
class Dataset:
    """A token store opened for training.

    Attributes:
        train: The training tokens, read-only (shards memory-mapped when touched); for a
            mixture, its first source's (``train_batches`` draws from every source).
        val: The validation tokens (empty when ``val_fraction`` is 0 and the source has none);
            for a mixture, every source's validation tokens end to end.
        tokenizer: The tokenizer that wrote them.
        meta: The store's ``meta.json``: source, tokenizer, the shard index, and per split
            the documents, tokens, UTF-8 ``bytes`` of text (for bits per byte; for token
            files, measured by decoding) and largest token id, plus a content hash of the
            source. For a mixture, the sums over its sources and ``mixture``.
        path: The store's folder (a mixture: its first source's).
        parts: A mixture's sources by name, each ``(weight, Dataset)``; empty otherwise.
    """

    train: Any
    val: Any
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path
    parts: dict[str, tuple[float, Dataset]] = dataclasses.field(default_factory=dict)


def _components(cfg: DataConfig) -> list[tuple[str, float, DataConfig]]:
    return [(n, w, dataclasses.replace(cfg, source=s, mixture="")) for n, w, s in parse_mixture(cfg.mixture)]


def prepare(data_cfg: DataConfig, **build: Any) -> dict[str, Any]:
    """Builds (or reuses) the token store of ``data_cfg`` (each of a mixture's) and returns its statistics.

    Args:
        data_cfg: The data section.
        **build: ``workers`` and ``pool`` for ``build.open_store``.

    Returns:
        ``meta.json``'s contents plus ``store`` (its folder), ``built`` (False when an existing
        store was reused), ``store_mb`` and flat ``{split}_{documents,tokens,bytes}`` entries.
        A mixture: ``mixture``, each source's statistics by name.
    """
    if data_cfg.mixture:
        return {"mixture": {name: prepare(part, **build) for name, _, part in _components(data_cfg)}}
    folder, meta, _, built = open_store(data_cfg, **build)
    size = sum(f.stat().st_size for f in folder.iterdir())
    flat = {f"{s}_{f}": meta[f][s] for s in SPLITS for f in ("documents", "tokens", "bytes")}
    return {**meta, **flat, "store": str(folder), "built": built, "store_mb": round(size / 1e6, 3)}


def load_dataset(data_cfg: DataConfig, *, seq_len: int, vocab_size: int) -> Dataset:
    """Opens the token store of ``data_cfg`` (building it first if needed) for a model.

    Args:
        data_cfg: The data section of the run's config.
        seq_len: The model's context length; the training split needs one window of
            ``seq_len + 1`` tokens.
        vocab_size: The model's vocabulary; the tokenizer and every token id must fit.

    Raises:
        GptjaxError: A source, tokenizer or split that cannot feed this model, with the fix.
    """
    if data_cfg.mixture:
        return _load_mixture(data_cfg, seq_len=seq_len, vocab_size=vocab_size)
    folder, meta, tokenizer, _ = open_store(data_cfg)
    if tokenizer.vocab_size > vocab_size:
        raise GptjaxError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}: set model.vocab_size >= {tokenizer.vocab_size} or choose a smaller tokenizer"
        )
    largest = max(meta["max_token_id"].values())
    if largest >= vocab_size:
        raise GptjaxError(
            f"the token store holds id {largest} >= model.vocab_size {vocab_size}: raise model.vocab_size"
        )
    tokens = meta["tokens"]
    if tokens["train"] < seq_len + 1:
        raise GptjaxError(
            f"the training split of {data_cfg.source!r} has {tokens['train']} tokens, fewer than one window "
            f"of seq_len + 1 = {seq_len + 1}: use a larger corpus or a shorter model.block_size"
        )
    if tokens["val"] < 2 and data_cfg.val_fraction > 0:
        raise GptjaxError(
            f"the validation split of {data_cfg.source!r} has {tokens['val']} tokens: "
            "raise data.val_fraction or use a larger corpus"
        )
    train, val = (store.open_split(folder, meta, s) for s in SPLITS)
    return Dataset(train=train, val=val, tokenizer=tokenizer, meta=meta, path=folder)


def _load_mixture(data_cfg: DataConfig, *, seq_len: int, vocab_size: int) -> Dataset:
    parts = {
        name: (weight, load_dataset(part, seq_len=seq_len, vocab_size=vocab_size))
        for name, weight, part in _components(data_cfg)
    }
    datasets = [d for _, d in parts.values()]
    meta = {
        "mixture": {name: {"weight": w, "store": str(d.path)} for name, (w, d) in parts.items()},
        **{
            f: {s: sum(d.meta[f][s] for d in datasets) for s in SPLITS}
            for f in ("documents", "tokens", "bytes")
        },
        "max_token_id": {s: max(d.meta["max_token_id"][s] for d in datasets) for s in SPLITS},
    }
    first = datasets[0]
    val = store.ShardedTokens.concatenate([d.val for d in datasets])
    return Dataset(
        train=first.train, val=val, tokenizer=first.tokenizer, meta=meta, path=first.path, parts=parts
    )


def train_batches(dataset: Dataset, **kwargs: Any) -> TrainBatches | MixtureBatches:
    """The training batches of a dataset: its own windows, or its sources' in their weights.

    Args:
        dataset: From ``load_dataset``.
        **kwargs: ``seq_len``, ``global_batch``, ``seed``, ``process_index``, ``process_count``.
    """
    if dataset.parts:
        return MixtureBatches([(w, d.train) for w, d in dataset.parts.values()], **kwargs)
    return TrainBatches(dataset.train, **kwargs)
