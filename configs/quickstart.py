"""The quick start as a file: a 0.8M-parameter byte-level GPT on the built-in stdlib corpus.

Command: ``gptjax train configs/quickstart.py`` (the same as plain ``gptjax train``).
Hardware: a 2-core CPU. Runtime: about 3 minutes (187 s measured). Validation loss: 1.82
nats per byte (from 5.55 untrained).
"""

from gptjax.config import quickstart


def get_config():
    return quickstart()
