"""Configuration: frozen, keyword-only dataclasses that validate themselves.

A run is described by one :class:`Config` with six sections (model, data, optim, mesh,
train, sample). Configs come from a preset name (``gpt2``, ``quickstart``), or a Python
file whose ``get_config()`` returns a :class:`Config`, plus dotted command-line overrides
(``model.n_layer=4 optim.lr=1e-3``) that are type-checked against the dataclass fields.

Validation raises :class:`gptjax.errors.GptjaxError` (a ``ValueError``) naming the field
and the numbers involved, never ``assert``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gptjax.errors import GptjaxError

_DTYPES = ("float32", "bfloat16", "float16")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise GptjaxError(message)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value >= 1, f"{name} ({value}) must be >= 1")


def _choices(obj: Any) -> None:
    # Literal fields are checked here, not only by the override parser: a config file
    # that builds ModelConfig(position="alibi") must fail, not train a model without positions.
    for name, annotation in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(annotation) is Literal:
            value, choices = getattr(obj, name), typing.get_args(annotation)
            _check(value in choices, f"{name} ({value!r}) must be one of {list(choices)}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The GPT architecture.

    Attributes:
        vocab_size: Rows of the token embedding; at least the tokenizer's vocabulary.
        block_size: Context length: the longest sequence the model accepts.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide n_embd.
        n_embd: Width of the residual stream (D).
        mlp_ratio: MLP hidden width as a multiple of n_embd (4 in GPT-1/2).
        embd_dropout: Dropout on the summed token + position embeddings.
        attn_dropout: Dropout on attention probabilities.
        resid_dropout: Dropout on each residual branch's output.
        bias: Biases in the linear layers and LayerNorms (GPT-2 has them).
        tie_embeddings: Share the LM head with the token embedding (GPT-2 does).
        position: ``learned`` absolute embeddings (GPT-1/2) or ``rope`` (Su et al. 2021).
        layer_norm_epsilon: LayerNorm epsilon (1e-5 in GPT-2).
        activation: ``gelu_tanh`` (GPT-2's approximation) or ``gelu`` (exact erf form).
        dtype: Compute dtype of activations and matmuls; ``bfloat16`` on accelerators.
        param_dtype: Storage dtype of parameters (and so of optimizer state).
        attention: ``xla`` (portable), ``cudnn`` (flash attention on NVIDIA GPUs) or
            ``auto`` (cuDNN when running on a GPU with a 16-bit dtype, else XLA).
        remat: Activation recomputation in the backward pass: ``none``, ``full``
            (recompute each block), ``dots`` (save the weight matmuls' outputs, recompute
            the rest) or ``auto`` (``dots`` on CPU, where it is faster, else ``none``).
        scan_layers: Run the blocks with ``lax.scan`` so compile time does not grow with
            depth. Parameters are stacked over layers either way, so checkpoints do not
            depend on this flag.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    position: Literal["learned", "rope"] = "learned"
    layer_norm_epsilon: float = 1e-5
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    remat: Literal["auto", "none", "full", "dots"] = "auto"
    scan_layers: bool = True

    def __post_init__(self) -> None:
        _choices(self)
        _positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio")
        _check(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        if self.position == "rope":
            head_dim = self.n_embd // self.n_head
            _check(head_dim % 2 == 0, f"rope needs an even head dim, got n_embd/n_head = {head_dim}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"{name} ({value}) must be in [0, 1)")
        _check(self.layer_norm_epsilon > 0, f"layer_norm_epsilon ({self.layer_norm_epsilon}) must be > 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from.

    Attributes:
        source: ``stdlib`` (built-in corpus), a path, directory or glob of text files,
            ``tfds:NAME``, or a pre-tokenized ``.bin``/``.npy`` token file.
        tokenizer: ``bytes`` or a tiktoken encoding (``gpt2``, ``r50k_base``, ...).
        val_fraction: Fraction of documents held out for validation when the source has
            no validation split of its own.
        text_field: The text key of JSONL records and of TFDS examples.
        train_split: The source's training split name (TFDS).
        val_split: The source's validation split name (TFDS); empty to split by document.
        cache_dir: Where token stores are written; empty means ``~/.cache/gptjax``.
        tfds_data_dir: TFDS's data_dir (empty: TFDS's own default, ``TFDS_DATA_DIR``).
        tfds_manual_dir: TFDS's manual_dir, for datasets built from local files offline.
        prefetch: Batches prepared ahead of the train step by a background thread.
        mixture: Several weighted sources, ``name=weight:source`` each (on the command line
            comma-separated: ``web=0.7:data/web,code=0.3:data/code``); when set, ``source``
            is not used. Every other field applies to each source.
    """

    source: str = "stdlib"
    tokenizer: str = "bytes"
    val_fraction: float = 0.005
    text_field: str = "text"
    train_split: str = "train"
    val_split: str = "validation"
    cache_dir: str = ""
    tfds_data_dir: str = ""
    tfds_manual_dir: str = ""
    prefetch: int = 2
    mixture: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.source), "data.source must not be empty")
        if isinstance(self.mixture, str):  # From the command line: comma-separated.
            object.__setattr__(self, "mixture", tuple(p for p in self.mixture.split(",") if p.strip()))
        object.__setattr__(self, "mixture", tuple(self.mixture))
        parse_mixture(self.mixture)
        _check(0.0 <= self.val_fraction < 1.0, f"val_fraction ({self.val_fraction}) must be in [0, 1)")
        _check(self.prefetch >= 0, f"prefetch ({self.prefetch}) must be >= 0")


def parse_mixture(mixture: tuple[str, ...]) -> list[tuple[str, float, str]]:
    """``data.mixture``'s parts as ``(name, weight, source)``; a malformed part raises, saying how."""
    parts = []
    for item in mixture:
        name, _, rest = item.partition("=")
        weight, colon, source = rest.partition(":")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        _check(
            bool(name.strip()) and bool(colon) and bool(source.strip()) and value > 0,
            f"data.mixture part {item!r} must look like name=weight:source, weight > 0 (web=0.7:data/web)",
        )
        parts.append((name.strip(), value, source.strip()))
    names = [n for n, _, _ in parts]
    _check(len(set(names)) == len(names), f"data.mixture names must differ: {names}")
    return parts


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with gradient clipping and a learning-rate schedule.

    Attributes:
        lr: Peak learning rate, reached at the end of warmup.
        min_lr: The floor the cosine (or the decay phase of wsd) ends at on the last step.
        schedule: ``cosine`` (linear warmup then cosine decay, the GPT recipe),
            ``constant`` (linear warmup then flat) or ``wsd`` (warmup-stable-decay).
        warmup_steps: Steps of linear warmup from 0 to lr.
        decay_fraction: For ``wsd``: the final fraction of steps that decays linearly.
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        eps: Adam's epsilon.
        weight_decay: Decoupled weight decay (AdamW).
        decay_embeddings: Also decay the embedding tables (GPT-2 practice is not to).
        grad_clip: Clip gradients to this global norm; 0 disables clipping.
        accum_steps: Micro-batches accumulated per update (a ``lax.scan``).
    """

    lr: float = 6e-4
    min_lr: float = 6e-5
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    grad_clip: float = 1.0
    accum_steps: int = 1

    def __post_init__(self) -> None:
        _choices(self)
        _check(self.lr > 0, f"lr ({self.lr}) must be > 0")
        _check(0 <= self.min_lr <= self.lr, f"min_lr ({self.min_lr}) must be in [0, lr={self.lr}]")
        _check(self.warmup_steps >= 0, f"warmup_steps ({self.warmup_steps}) must be >= 0")
        _check(0 < self.decay_fraction <= 1, f"decay_fraction ({self.decay_fraction}) must be in (0, 1]")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"{name} ({value}) must be in [0, 1)")
        _check(self.eps > 0, f"eps ({self.eps}) must be > 0")
        _check(self.weight_decay >= 0, f"weight_decay ({self.weight_decay}) must be >= 0")
        _check(self.grad_clip >= 0, f"grad_clip ({self.grad_clip}) must be >= 0")
        _positive(self, "accum_steps")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The device mesh. -1 on one axis means "all remaining devices".

    Attributes:
        data: Data-parallel replicas (parameters replicated).
        fsdp: Fully-sharded data parallel: parameters and optimizer state sharded.
        tensor: Tensor (Megatron) parallel: heads and MLP hidden units split.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, value in sizes.items():
            _check(value == -1 or value >= 1, f"mesh.{name} ({value}) must be >= 1 or -1")
        _check(
            sum(v == -1 for v in sizes.values()) <= 1,
            f"at most one mesh axis may be -1, got {sizes}",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop.

    Attributes:
        steps: Optimizer updates to run.
        batch_size: Global batch size in sequences, per update (all micro-batches).
        seed: The run's one seed: model init, data order and dropout derive from it.
        log_every: Steps between metric rows.
        eval_every: Steps between full-pass validation evaluations; 0 disables them.
        eval_max_batches: Cap on validation batches per evaluation; 0 means the full pass.
        checkpoint_every: Steps between checkpoints; 0 saves only at the end.
        keep_checkpoints: Most recent checkpoints kept (the best by val loss is kept too).
        sample_every: Steps between printed samples; 0 prints only at the end.
        run_dir: Run directory; empty means ``runs/<config name>``.
        peak_flops: Peak FLOP/s per device for MFU; 0 uses the built-in table.
        init_from: A run directory or checkpoint whose parameters start this run (e.g. a
            GPT-2 imported with ``gptjax import-hf``); the optimizer starts fresh.
        max_bad_steps: Consecutive steps with a non-finite loss or gradient (each one
            skipped) after which the run stops, keeping its last good checkpoint.
    """

    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    eval_max_batches: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    sample_every: int = 0
    run_dir: str = ""
    peak_flops: float = 0.0
    init_from: str = ""
    max_bad_steps: int = 10

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "log_every", "keep_checkpoints")
        for name in ("eval_every", "eval_max_batches", "checkpoint_every", "sample_every"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} ({value}) must be >= 0")
        _check(self.peak_flops >= 0, f"peak_flops ({self.peak_flops}) must be >= 0")
        _check(self.max_bad_steps >= 0, f"max_bad_steps ({self.max_bad_steps}) must be >= 0")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Text generation.

    Attributes:
        prompt: Text the samples continue; empty starts from end-of-text.
        num_samples: Samples drawn (0: none at the end of training).
        max_new_tokens: Tokens generated per sample.
        temperature: Softmax temperature; 0 is greedy.
        top_k: Keep the k most likely tokens; 0 disables.
        top_p: Keep the smallest set with this much probability (nucleus); 1 disables.
        min_p: Drop tokens below min_p times the top probability; 0 disables.
        seed: Sampling seed.
    """

    prompt: str = ""
    num_samples: int = 2
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens")
        _check(self.num_samples >= 0, f"num_samples ({self.num_samples}) must be >= 0")
        _check(self.temperature >= 0, f"temperature ({self.temperature}) must be >= 0")
        _check(self.top_k >= 0, f"top_k ({self.top_k}) must be >= 0 (0 disables it)")
        _check(0 < self.top_p <= 1, f"top_p ({self.top_p}) must be in (0, 1]")
        _check(0 <= self.min_p < 1, f"min_p ({self.min_p}) must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run: one of each section plus a name (the default run directory)."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        from gptjax.tokenizer import known_vocab_size

        tok_vocab = known_vocab_size(self.data.tokenizer)
        if tok_vocab is not None:
            _check(
                self.model.vocab_size >= tok_vocab,
                f"model.vocab_size ({self.model.vocab_size}) is smaller than tokenizer "
                f"{self.data.tokenizer!r}'s vocabulary ({tok_vocab})",
            )
        _check(
            self.optim.warmup_steps <= self.train.steps,
            f"optim.warmup_steps ({self.optim.warmup_steps}) is longer than training "
            f"(train.steps = {self.train.steps})",
        )
        _check(
            self.train.batch_size % self.optim.accum_steps == 0,
            f"train.batch_size ({self.train.batch_size}) must be divisible by "
            f"optim.accum_steps ({self.optim.accum_steps})",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in sections:
                raise GptjaxError(f"unknown config section {key!r}")
            if key == "name":
                kwargs[key] = value
            else:
                section_cls = _SECTIONS[key]
                known = {f.name for f in dataclasses.fields(section_cls)}
                unknown = set(value) - known
                _check(not unknown, f"unknown field(s) {sorted(unknown)} in config section {key!r}")
                kwargs[key] = section_cls(**value)
        return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}

# --------------------------------------------------------------------------------------
# Presets

MODEL_PRESETS: dict[str, ModelConfig] = {
    # Radford et al. 2018: 12 x 768, 12 heads, 512 context, 40,478 BPE tokens, exact GELU.
    "gpt1": ModelConfig(vocab_size=40478, block_size=512, activation="gelu"),
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


RUN_PRESETS = {"quickstart": quickstart}


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
    spec = importlib.util.spec_from_file_location(f"gptjax_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        result = getattr(module, function)() if hasattr(module, function) else None
    except GptjaxError:
        raise
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
    changes: dict[str, dict[str, Any]] = {}
    name = config.name
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep:
            raise GptjaxError(f"override {item!r} must look like section.field=value")
        if key == "name":
            name = raw
            continue
        section, dot, field_name = key.partition(".")
        if not dot or section not in _SECTIONS:
            raise GptjaxError(
                f"unknown config key {key!r}: expected section.field with section one of {sorted(_SECTIONS)}"
            )
        hints = typing.get_type_hints(_SECTIONS[section])
        if field_name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))
            raise GptjaxError(f"unknown config key {key!r}; {section} has: {known}")
        changes.setdefault(section, {})[field_name] = _parse_value(key, raw, hints[field_name])
    new_sections = {s: dataclasses.replace(getattr(config, s), **kw) for s, kw in changes.items()}
    return dataclasses.replace(config, name=name, **new_sections)


def _parse_value(key: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if raw not in choices:
            raise GptjaxError(f"{key}={raw!r} is not one of {list(choices)}")
        return raw
    if origin in (typing.Union, types.UnionType):
        raise GptjaxError(f"{key} cannot be set from the command line")  # no such fields yet
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise GptjaxError(f"{key}={raw!r} is not a boolean (true/false)")
    if annotation is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise GptjaxError(f"{key}={raw!r} is not an integer") from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise GptjaxError(f"{key}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise GptjaxError(f"{key}={raw!r} must be finite")
        return value
    return raw


# --------------------------------------------------------------------------------------
# Derived quantities


def param_counts(model: ModelConfig) -> dict[str, int]:
    """Parameter counts, computed from the config (tests check them against the model).

    ``non_embedding`` follows Kaplan et al. (2020): everything except the token and
    position embeddings (an untied LM head counts as non-embedding, as it is a matmul).
    """
    d, v, t, ffn = model.n_embd, model.vocab_size, model.block_size, model.mlp_ratio * model.n_embd
    b = 1 if model.bias else 0
    ln = d * (1 + b)  # scale (+ bias)
    block = 2 * ln + (d * 3 * d + b * 3 * d) + (d * d + b * d) + (d * ffn + b * ffn) + (ffn * d + b * d)
    embedding = v * d + (t * d if model.position == "learned" else 0)
    non_embedding = model.n_layer * block + ln + (0 if model.tie_embeddings else v * d)
    return {"total": embedding + non_embedding, "non_embedding": non_embedding, "embedding": embedding}


def flops_per_token(model: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3x forward).

    Formula: ``6 * N_matmul + 6 * n_layer * T * n_embd``. ``N_matmul`` is the
    non-embedding parameters plus the LM head's ``vocab x n_embd`` matmul (computed even
    when tied). The second term is attention: per token and layer, QK^T and AV each take
    ``2 * T * D`` FLOPs forward when every query sees all T keys, so ``12 * T * D`` for
    forward + backward (PaLM's ``12 L H Q T``), halved because a causal query sees
    (T + 1) / 2 keys on average.
    """
    t = seq_len or model.block_size
    counts = param_counts(model)
    n_matmul = counts["non_embedding"] + (model.vocab_size * model.n_embd if model.tie_embeddings else 0)
    attention = 6 * model.n_layer * t * model.n_embd
    return {
        "total": 6.0 * n_matmul + attention,
        "dense": 6.0 * n_matmul,
        "attention": float(attention),
        "forward": (6.0 * n_matmul + attention) / 3.0,
    }


def info(config: Config) -> dict[str, Any]:
    """What ``gptjax info`` prints: sizes, FLOPs per token and fp32 training memory."""
    counts = param_counts(config.model)
    flops = flops_per_token(config.model)
    return {
        "name": config.name,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "embedding_params": counts["embedding"],
        "flops_per_token": flops["total"],
        "flops_per_token_attention": flops["attention"],
        "seq_len": config.model.block_size,
        "param_bytes_fp32": 4 * counts["total"],
        "adamw_state_bytes_fp32": 8 * counts["total"],
        "model": dataclasses.asdict(config.model),
    }
