"""GPT-2 XL (1.5B) on a TPU v5e-16 slice: the layout ``gptjax plan`` found, compiled and fitting.

Command: ``gptjax train configs/tpu_gpt2xl_v5e16.py data.source=/data/owt/train.bin``
Check without a TPU: ``gptjax train configs/tpu_gpt2xl_v5e16.py --dry-run --target v5e-16``
Found by: ``gptjax plan gpt2-xl model.dtype=bfloat16 train.batch_size=32 --target v5e-16``
Target: v5e-16 (16 chips, 16 GiB HBM each). Layout: FSDP over all 16 chips (parameters,
gradients and AdamW moments sharded), remat ``dots``, splash attention, global batch 32 x
1024 tokens in one step. Data parallelism (the default mesh) does not fit: the compiler
asks for 52.6 GiB of temporaries.
Per chip (XLA:TPU via libtpu 0.0.42.1, jax 0.10.2): 6.8 GiB; fits.
Runtime and loss: not measured (no TPU here); ``tests/test_tpu.py`` recompiles this recipe.
"""

import dataclasses

from gptjax.config import MODEL_PRESETS, Config, DataConfig, MeshConfig, OptimConfig, TrainConfig


def get_config():
    return Config(
        name="tpu_gpt2xl_v5e16",
        model=dataclasses.replace(MODEL_PRESETS["gpt2-xl"], dtype="bfloat16", remat="dots"),
        data=DataConfig(source="train.bin", tokenizer="gpt2"),
        optim=OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=2000, weight_decay=0.1),
        mesh=MeshConfig(data=1, fsdp=16, tensor=1),
        train=TrainConfig(steps=600_000, batch_size=32, eval_every=2000, checkpoint_every=2000),
    )
