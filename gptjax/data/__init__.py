"""Data: every source becomes one cached, sharded token store; every batch is a function of (seed, step).

One module per concept:

* ``sources``: what ``data.source`` may name (``stdlib``; text, JSONL and Parquet files,
  directories and globs, gzip or zstd compressed; ``tfds:NAME``; ``hf-disk:PATH``;
  ``hf:NAME[:SUBSET]``; pre-tokenized ``.bin``/``.npy`` files) and their documents.
* ``store``: the on-disk format (shards of a fixed number of tokens, one index) and its
  writer and lazily memory-mapped reader.
* ``build``: building a store in parallel, with a progress bar, resumably, published
  atomically.
* ``workers``: the tokenizing pool a build hands its chunks to.
* ``batches``: training batches (one source or a mixture) and the ordered eval pass.
* ``dataset``: opening a store (or a mixture's stores) for a model.

A source without a validation split of its own has evenly spaced documents held out,
exactly ``floor(n * val_fraction)`` of its n; with fewer than ``1 / val_fraction``
documents, the last ``val_fraction`` of its tokens instead.
"""

from gptjax.data import build, sources  # noqa: F401 (the submodules, for gptjax.data.build.X)
from gptjax.data.batches import MixtureBatches, TrainBatches, eval_batches
from gptjax.data.build import STORE_FORMAT, cache_dir
from gptjax.data.dataset import Dataset, load_dataset, prepare, train_batches
from gptjax.data.store import ShardedTokens

__all__ = [
    "STORE_FORMAT",
    "Dataset",
    "MixtureBatches",
    "ShardedTokens",
    "TrainBatches",
    "cache_dir",
    "eval_batches",
    "load_dataset",
    "prepare",
    "train_batches",
]
