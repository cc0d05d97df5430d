"""A small scaling sweep: 4 byte-level model sizes x 3 token budgets on the stdlib corpus.

Run it, fit it and plot it (12 runs, about 6 minutes on a 2-core CPU)::

    gptjax sweep configs/sweep_small.py --dir /tmp/sweep_small
    gptjax fit /tmp/sweep_small
    gptjax plot /tmp/sweep_small

Sizes run from 4K to 100K non-embedding parameters (n_embd 16..64, context 64) and budgets
from 41K to 164K tokens, so the sweep is far from the compute-optimal regime of big models;
it exists to exercise the whole pipeline (sweep, table, fits, plots) on a laptop.
"""

import dataclasses

from gptjax.config import (
    MODEL_PRESETS,
    Config,
    DataConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from gptjax.scaling import Sweep


def get_sweep() -> Sweep:
    base = Config(
        name="sweep_small",
        model=dataclasses.replace(MODEL_PRESETS["nano"], block_size=64),
        data=DataConfig(source="stdlib", tokenizer="bytes"),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=20, weight_decay=0.0),
        train=TrainConfig(
            batch_size=8,
            log_every=10,
            eval_every=0,
            eval_max_batches=16,
            checkpoint_every=50,
            keep_checkpoints=1,
        ),
        sample=SampleConfig(num_samples=1, max_new_tokens=8),
    )
    return Sweep(
        name="sweep_small",
        base=base,
        axes={
            "size": [(1, 16, 2), (2, 24, 2), (2, 40, 4), (3, 64, 4)],
            "tokens": [40_960, 81_920, 163_840],
        },
    )
