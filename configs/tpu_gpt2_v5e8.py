"""GPT-2 124M on a TPU v5e-8 slice: a layout the compiler says fits (``gptjax plan`` chose it).

Command: ``gptjax train configs/tpu_gpt2_v5e8.py data.source=/data/owt/train.bin``
Check without a TPU: ``gptjax train configs/tpu_gpt2_v5e8.py --dry-run --target v5e-8``
Target: v5e-8 (8 chips, 16 GiB HBM each). Layout: data parallel over 8 chips, no remat,
splash attention, 4 micro-batches of 8 sequences x 1024 tokens (global batch 32).
Per chip (XLA:TPU via libtpu 0.0.42.1, jax 0.10.2): 4.48 GiB; fits.
Runtime and loss: not measured (no TPU here); ``tests/test_tpu.py`` recompiles this recipe.
"""

import dataclasses

from gptjax.config import MODEL_PRESETS, Config, DataConfig, MeshConfig, OptimConfig, TrainConfig


def get_config():
    return Config(
        name="tpu_gpt2_v5e8",
        model=dataclasses.replace(MODEL_PRESETS["gpt2"], dtype="bfloat16", remat="none"),
        data=DataConfig(source="train.bin", tokenizer="gpt2"),
        optim=OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=2000, weight_decay=0.1, accum_steps=4),
        mesh=MeshConfig(data=8, fsdp=1, tensor=1),
        train=TrainConfig(steps=600_000, batch_size=32, eval_every=2000, checkpoint_every=2000),
    )
