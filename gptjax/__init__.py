"""gptjax: GPT-style language models in JAX and Flax NNX.

The public names below are imported on first use (PEP 562), so ``import gptjax`` (and
``gptjax --help``) does not start JAX. ``gptjax.train``, ``gptjax.evaluate`` and
``gptjax.finetune`` are the modules; calling ``gptjax.train(config)`` trains.
"""

import importlib

__version__ = "0.1.0"

# Modules the README names as library entry points.
_MODULES = ("evaluate", "finetune", "train")

# public name -> the module that defines it
_EXPORTS = {
    "Config": "gptjax.config",
    "DataConfig": "gptjax.config",
    "MeshConfig": "gptjax.config",
    "ModelConfig": "gptjax.config",
    "OptimConfig": "gptjax.config",
    "SampleConfig": "gptjax.config",
    "TrainConfig": "gptjax.config",
    "load_config": "gptjax.config",
    "GptjaxError": "gptjax.errors",
    "GPT": "gptjax.model",
    "load": "gptjax.runs",
    "SamplingParams": "gptjax.sample",
    "generate": "gptjax.sample",
    "stream": "gptjax.sample",
}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"gptjax.{name}")  # importing sets the attribute
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
