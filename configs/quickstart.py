"""The quick start as a file: a 1.9M-parameter byte-level GPT on the built-in stdlib corpus.

Command: ``gptjax train configs/quickstart.py`` (the same as plain ``gptjax train``).
Hardware: a 2-core CPU. Runtime and loss: see the README's quick start (measured there).
"""

from gptjax.config import quickstart


def get_config():
    return quickstart()
