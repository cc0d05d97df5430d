"""GPT-2 XL (1.5B) on a TPU v5p-32 slice (16 chips): the layout ``scripts/tpu_table.py`` planned and compiled.

Command: ``gptjax train configs/tpu_gpt2xl_v5p32.py data.source=/data/owt/train.bin``
Check without a TPU: ``gptjax train configs/tpu_gpt2xl_v5p32.py --dry-run --target v5p-32``
Target: v5p-32 (16 chips, 95 GiB HBM each). Layout: data parallel over 16 chips, no remat,
splash attention, 2 micro-batches of 16 sequences x 1024 tokens (global batch 32): v5p's
HBM holds the replicated parameters and AdamW moments, so no FSDP traffic is needed.
Per chip (XLA:TPU via libtpu 0.0.42.1, jax 0.10.2): 53.81 GiB; fits.
Runtime and loss: not measured (no TPU here); ``tests/test_tpu.py`` recompiles this recipe.
"""

import dataclasses

from gptjax.config import MODEL_PRESETS, Config, DataConfig, MeshConfig, OptimConfig, TrainConfig


def get_config():
    return Config(
        name="tpu_gpt2xl_v5p32",
        model=dataclasses.replace(MODEL_PRESETS["gpt2-xl"], dtype="bfloat16", remat="none"),
        data=DataConfig(source="train.bin", tokenizer="gpt2"),
        optim=OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=2000, weight_decay=0.1, accum_steps=2),
        mesh=MeshConfig(data=16, fsdp=1, tensor=1),
        train=TrainConfig(steps=600_000, batch_size=32, eval_every=2000, checkpoint_every=2000),
    )
