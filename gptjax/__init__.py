"""gptjax: GPT-style language models in JAX and Flax NNX."""

from gptjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig
from gptjax.config import load_config
from gptjax.errors import GptjaxError
from gptjax.model import GPT

__all__ = [
    "GPT",
    "Config",
    "DataConfig",
    "GptjaxError",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "TrainConfig",
    "load_config",
]
__version__ = "0.1.0"
