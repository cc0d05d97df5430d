"""Recipes: the presets, loading a config (preset name or ``.py`` file), and dotted
command-line overrides (``section.field=value``), type-checked against the dataclasses.

:mod:`gptjax.config` re-exports every name here, so ``gptjax.config.load_config`` and
``gptjax.config.MODEL_PRESETS`` keep working.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from gptjax import fields
from gptjax.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from gptjax.errors import GptjaxError, GptjaxWarning

# --------------------------------------------------------------------------------------
# Presets

MODEL_PRESETS: dict[str, ModelConfig] = {
    # Radford et al. 2018: 12 x 768, 12 heads, 512 context, 40,478 BPE tokens, exact GELU.
    "gpt1": ModelConfig(
        vocab_size=40478,
        block_size=512,
        activation="gelu",
        embd_dropout=0.1,
        attn_dropout=0.1,
        resid_dropout=0.1,
    ),
    # Radford et al. 2019 (the released GPT-2 checkpoints' hyperparameters).
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600),
    # CPU-sized models for tests, demos and sweeps (byte vocabulary: 256 + end-of-text).
    "nano": ModelConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32),
    "micro": ModelConfig(vocab_size=257, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "mini": ModelConfig(vocab_size=257, block_size=256, n_layer=6, n_head=6, n_embd=192),
}


def quickstart() -> Config:
    """The default of ``gptjax train``: a small byte-level model on the stdlib corpus.

    About 0.8M parameters (4 layers x 128); 800 steps of 16 x 128 bytes, then samples that
    look like Python. The README gives the measured time and loss.
    """
    return Config(
        name="quickstart",
        model=MODEL_PRESETS["micro"],
        data=DataConfig(source="stdlib", tokenizer="bytes"),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=50, weight_decay=0.1),
        train=TrainConfig(
            steps=800,
            batch_size=16,
            log_every=50,
            eval_every=400,
            eval_max_batches=20,
            checkpoint_every=400,
        ),
        sample=SampleConfig(prompt="def ", num_samples=2, max_new_tokens=160, temperature=0.7),
    )


def gpt1() -> Config:
    """GPT-1's pretraining recipe (Radford et al. 2018, section 4.1): dropout 0.1, Adam
    (beta2 0.999) at 2.5e-4 warmed up over 2000 updates and cosine-annealed to 0, weight
    decay 0.01, minibatches of 64 x 512 tokens. The paper gives 100 epochs of BooksCorpus,
    not an update count: set ``train.steps`` for your data. GPT-1's 40k BPE is not a
    tiktoken encoding, so the tokenizer is bytes until you bring token files.
    """
    return Config(
        name="gpt1",
        model=MODEL_PRESETS["gpt1"],
        data=DataConfig(tokenizer="bytes"),
        optim=OptimConfig(lr=2.5e-4, min_lr=0.0, warmup_steps=2000, beta2=0.999, weight_decay=0.01),
        train=TrainConfig(steps=100_000, batch_size=64),
    )


RUN_PRESETS = {"quickstart": quickstart, "gpt1": gpt1}


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset name or config file, then apply ``section.field=value`` overrides.

    ``name_or_path`` may be a run preset (``quickstart``), a model preset (``gpt2``: the
    model with every other section at its default), or a ``.py`` file defining
    ``get_config() -> Config``. ``None`` means ``quickstart``.
    """
    name_or_path = name_or_path or "quickstart"
    if name_or_path in RUN_PRESETS:
        config = RUN_PRESETS[name_or_path]()
    elif name_or_path in MODEL_PRESETS:
        config = _with_model_preset(name_or_path)
    elif name_or_path.endswith(".py") or Path(name_or_path).exists():
        config = _from_file(Path(name_or_path))
    else:
        choices = ", ".join([*RUN_PRESETS, *MODEL_PRESETS])
        raise GptjaxError(f"unknown config {name_or_path!r}: give a preset ({choices}) or a .py config file")
    return apply_overrides(config, overrides)


def _with_model_preset(name: str) -> Config:
    model = MODEL_PRESETS[name]
    # GPT-1's 40k BPE is not a tiktoken encoding: it gets bytes until you bring token files.
    tokenizer = "gpt2" if model.vocab_size >= 50257 else "bytes"
    return Config(name=name, model=model, data=DataConfig(tokenizer=tokenizer))


def load_recipe(path: str | Path, function: str, expected: type, what: str) -> Any:
    """Import a user's Python file and return ``function()``, checked to be an ``expected``.

    Config, sweep and fine-tune files all load here, so a missing file, a file that fails
    to import, or a wrong return type gives the same kind of one-line error.
    """
    path = Path(path)
    if not path.is_file():
        raise GptjaxError(f"{what} {str(path)!r} does not exist: give a .py file defining {function}()")
    if path.suffix != ".py":
        raise GptjaxError(f"{what} {str(path)!r} is not a .py file: give a .py file defining {function}()")
    spec = importlib.util.spec_from_file_location(f"gptjax_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        result = getattr(module, function)() if hasattr(module, function) else None
    except GptjaxError:
        raise
    except SystemExit as e:  # sys.exit() in a recipe must not end gptjax silently
        raise GptjaxError(f"{what} {str(path)!r} called sys.exit({e.code!r}) while loading") from None
    except Exception as e:  # A user's file failed to import: say which and why.
        raise GptjaxError(f"{what} {str(path)!r} failed to load: {type(e).__name__}: {e}") from e
    if result is None:
        raise GptjaxError(f"{what} {str(path)!r} must define {function}() returning a {expected.__name__}")
    if not isinstance(result, expected):
        raise GptjaxError(
            f"{function}() in {str(path)!r} returned {type(result).__name__}, "
            f"not a gptjax {expected.__name__}"
        )
    return result


def _from_file(path: Path) -> Config:
    return load_recipe(path, "get_config", Config, "config file")


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.field=value`` strings; unknown keys and bad types are rejected."""
    changes = fields.parse(Config, overrides)
    _implied_changes(config, changes)
    return fields.replace(config, changes)


def _implied_changes(config: Config, changes: dict[str, Any]) -> None:
    """What the user's overrides imply for the fields they did not set (edits ``changes``).

    - A mesh axis set to -1 takes the rest of the devices: the preset's own -1 becomes 1
      (``gpt2 mesh.fsdp=-1`` is FSDP over every device, not an error).
    - A new tokenizer brings its vocabulary size unless ``model.vocab_size`` is given.
    - Fewer steps than the warmup shorten it to a tenth of the run, with a warning (the
      schedule still decays), unless ``optim.warmup_steps`` is given too (then the
      config's check names both).
    """
    from gptjax.tokenizer import known_vocab_size

    if -1 in (changes.get(f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")):
        for axis in ("data", "fsdp", "tensor"):
            if f"mesh.{axis}" not in changes and getattr(config.mesh, axis) == -1:
                changes[f"mesh.{axis}"] = 1
    tokenizer = changes.get("data.tokenizer")
    vocab = known_vocab_size(tokenizer) if tokenizer else None
    if vocab is not None and "model.vocab_size" not in changes:
        changes["model.vocab_size"] = vocab
    steps = changes.get("train.steps", config.train.steps)
    if "optim.warmup_steps" not in changes and config.optim.warmup_steps > steps >= 1:
        changes["optim.warmup_steps"] = steps // 10
        warnings.warn(
            f"optim.warmup_steps ({config.optim.warmup_steps}) is longer than training "
            f"(train.steps = {steps}): shortened to {steps // 10} steps, a tenth of the run",
            GptjaxWarning,
            stacklevel=3,
        )
