"""gptjax: GPT-style language models in JAX and Flax NNX.

The public names below are imported on first use (PEP 562), so ``import gptjax`` (and
``gptjax --help``) does not start JAX; ``gptjax.train(config)`` imports what it needs.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

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
    "train": "gptjax.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``gptjax.train`` is the function, as before imports became lazy.

    Importing the submodule ``gptjax.train`` makes Python set the package attribute
    ``train`` to the module; the function of the same name keeps the attribute instead.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
