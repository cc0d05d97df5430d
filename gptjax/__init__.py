"""gptjax: GPT-style language models in JAX and Flax NNX."""

# Modules the README names as library entry points. ``gptjax.train`` is the module, and
# calling it trains (``gptjax.train(config)``), so the function no longer shadows it.
from gptjax import evaluate, finetune, train
from gptjax.config import (
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    load_config,
)
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.runs import load
from gptjax.sample import SamplingParams, generate, stream

__all__ = [
    "GPT",
    "Config",
    "DataConfig",
    "GptjaxError",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "SamplingParams",
    "TrainConfig",
    "evaluate",
    "finetune",
    "generate",
    "load",
    "load_config",
    "stream",
    "train",
]
__version__ = "0.1.0"
