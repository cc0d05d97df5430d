"""A byte-level GPT on TFDS tiny_shakespeare (nanoGPT's shakespeare_char, in bytes).

Command: ``pip install -e '.[tfds]' && gptjax train configs/shakespeare_bytes.py``
(TFDS downloads the 1 MB text once; offline, put it in a folder as ``input.txt`` and add
``data.tfds_manual_dir=FOLDER``).
Hardware: a CPU is enough; 6 x 192, context 256, 2,000 steps of 32 x 256 tokens.
Runtime and loss: not measured on this project's CI machine; expect validation loss near
1.5 nats/byte (about 2.2 bits/byte) when it converges, as char-level Shakespeare models do.
"""

from gptjax.config import Config, DataConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig


def get_config():
    return Config(
        name="shakespeare_bytes",
        model=ModelConfig(
            vocab_size=257,
            block_size=256,
            n_layer=6,
            n_head=6,
            n_embd=192,
            embd_dropout=0.1,
            resid_dropout=0.1,
        ),
        data=DataConfig(source="tfds:tiny_shakespeare", tokenizer="bytes"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99),
        train=TrainConfig(steps=2000, batch_size=32, eval_every=250, checkpoint_every=500),
        sample=SampleConfig(prompt="ROMEO:", max_new_tokens=300),
    )
