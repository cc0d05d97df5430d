"""gptjax: GPT-style language models in JAX and Flax NNX."""

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
from gptjax.train import train

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
    "generate",
    "load",
    "load_config",
    "stream",
    "train",
]
__version__ = "0.1.0"
