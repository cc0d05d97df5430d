"""GPT-2 124M from scratch on a pre-tokenized corpus (e.g. OpenWebText prepared by
nanoGPT's ``data/openwebtext/prepare.py``, which writes ``train.bin``/``val.bin`` of uint16).

Command: ``gptjax train configs/gpt2_124m.py data.source=/data/owt/train.bin``
Hardware: 8 accelerators (A100/H100, or a TPU v4-8/v5e-8); bfloat16 compute, a data-parallel
mesh (``mesh.fsdp=-1 mesh.data=1`` for FSDP when memory is short). 491,520 tokens per
update (480 x 1024), 600k updates, about 300B tokens.
Runtime and loss: not measured by this project (no accelerators on its CI machine). The
recipe is GPT-2's as reproduced by nanoGPT, which reports a validation loss of about 2.85
on OpenWebText after 600k updates (roughly 4 days on 8 x A100 40GB).
"""

import dataclasses

from gptjax.config import MODEL_PRESETS, Config, DataConfig, MeshConfig, OptimConfig, TrainConfig


def get_config():
    return Config(
        name="gpt2_124m",
        model=dataclasses.replace(MODEL_PRESETS["gpt2"], dtype="bfloat16", remat="dots"),
        data=DataConfig(source="train.bin", tokenizer="gpt2"),
        optim=OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=2000, weight_decay=0.1, beta2=0.95),
        mesh=MeshConfig(data=-1),
        train=TrainConfig(
            steps=600_000,
            batch_size=480,
            eval_every=2000,
            eval_max_batches=200,
            checkpoint_every=2000,
            keep_checkpoints=3,
        ),
    )
