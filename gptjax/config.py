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
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from gptjax.errors import GptjaxError
from gptjax.fields import check, check_types, positive

_DTYPES = ("float32", "bfloat16", "float16")


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
        attention: ``xla`` (portable), ``cudnn`` (flash attention on NVIDIA GPUs),
            ``splash`` (the Pallas splash-attention kernel on TPU; interpreted, slowly,
            elsewhere) or ``auto`` (splash on TPU, cuDNN on a GPU with a 16-bit dtype,
            else XLA).
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
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    remat: Literal["auto", "none", "full", "dots"] = "auto"
    scan_layers: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio")
        check(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        if self.position == "rope":
            head_dim = self.n_embd // self.n_head
            check(head_dim % 2 == 0, f"rope needs an even head dim, got n_embd/n_head = {head_dim}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"{name} ({value}) must be in [0, 1)")
        check(self.layer_norm_epsilon > 0, f"layer_norm_epsilon ({self.layer_norm_epsilon}) must be > 0")

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
        check_types(self)
        check(bool(self.source), "data.source must not be empty")
        if isinstance(self.mixture, str):  # From the command line: comma-separated.
            object.__setattr__(self, "mixture", tuple(p for p in self.mixture.split(",") if p.strip()))
        object.__setattr__(self, "mixture", tuple(self.mixture))
        parse_mixture(self.mixture)
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction ({self.val_fraction}) must be in [0, 1)")
        check(self.prefetch >= 0, f"prefetch ({self.prefetch}) must be >= 0")


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
        check(
            bool(name.strip()) and bool(colon) and bool(source.strip()) and value > 0,
            f"data.mixture part {item!r} must look like name=weight:source, weight > 0 (web=0.7:data/web)",
        )
        parts.append((name.strip(), value, source.strip()))
    names = [n for n, _, _ in parts]
    check(len(set(names)) == len(names), f"data.mixture names must differ: {names}")
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
        check_types(self)
        check(self.lr > 0, f"lr ({self.lr}) must be > 0")
        check(0 <= self.min_lr <= self.lr, f"min_lr ({self.min_lr}) must be in [0, lr={self.lr}]")
        check(self.warmup_steps >= 0, f"warmup_steps ({self.warmup_steps}) must be >= 0")
        check(0 < self.decay_fraction <= 1, f"decay_fraction ({self.decay_fraction}) must be in (0, 1]")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(0 <= value < 1, f"{name} ({value}) must be in [0, 1)")
        check(self.eps > 0, f"eps ({self.eps}) must be > 0")
        check(self.weight_decay >= 0, f"weight_decay ({self.weight_decay}) must be >= 0")
        check(self.grad_clip >= 0, f"grad_clip ({self.grad_clip}) must be >= 0")
        positive(self, "accum_steps")


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
        check_types(self)
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, value in sizes.items():
            check(value == -1 or value >= 1, f"mesh.{name} ({value}) must be >= 1 or -1")
        check(
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
        wandb_project: Also log metrics to this Weights & Biases project (``pip install
            wandb``; ``WANDB_MODE=offline`` writes them under the run directory); empty: off.
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
    wandb_project: str = ""

    def __post_init__(self) -> None:
        check_types(self)
        positive(self, "steps", "batch_size", "log_every", "keep_checkpoints")
        for name in ("eval_every", "eval_max_batches", "checkpoint_every", "sample_every"):
            value = getattr(self, name)
            check(value >= 0, f"{name} ({value}) must be >= 0")
        check(self.peak_flops >= 0, f"peak_flops ({self.peak_flops}) must be >= 0")
        check(self.max_bad_steps >= 0, f"max_bad_steps ({self.max_bad_steps}) must be >= 0")
        check(-(2**63) <= self.seed < 2**63, f"seed ({self.seed}) must fit in 64 bits")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How the next token is chosen; the filters combine (temperature first, then the rest).

    Attributes:
        temperature: Divides the logits; 0 is greedy (argmax), and values near 0 approach it.
        top_k: Keep the k most likely tokens; 0 disables (Fan et al. 2018).
        top_p: Keep the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling, Holtzman et al. 2020); 1 disables. The top token always stays.
        min_p: Drop tokens whose probability is below min_p times the top token's (Nguyen
            et al. 2024); 0 disables.
    """

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        check_types(self)  # numbers are numbers (and finite) before their ranges are checked
        if not 0 <= self.temperature < math.inf:
            raise GptjaxError(f"temperature ({self.temperature}) must be >= 0 and finite (0 is greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GptjaxError(f"top_k ({self.top_k}) must be an integer >= 1, or 0 to disable it")
        if not 0 < self.top_p <= 1:
            raise GptjaxError(f"top_p ({self.top_p}) must be in (0, 1]; 1 disables it")
        if not 0 <= self.min_p < 1:
            raise GptjaxError(f"min_p ({self.min_p}) must be in [0, 1); 0 disables it")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Text generation.

    Attributes:
        prompt: Text the samples continue; empty starts from end-of-text.
        num_samples: Samples drawn (0: none at the end of training).
        max_new_tokens: Tokens generated per sample.
        temperature, top_k, top_p, min_p: The knobs of :class:`SamplingParams` (documented
            and validated there, once).
        seed: Sampling seed.
    """

    prompt: str = ""
    num_samples: int = 2
    max_new_tokens: int = 200
    temperature: float = SamplingParams.temperature
    top_k: int = SamplingParams.top_k
    top_p: float = SamplingParams.top_p
    min_p: float = SamplingParams.min_p
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        positive(self, "max_new_tokens")
        check(self.num_samples >= 0, f"num_samples ({self.num_samples}) must be >= 0")
        self.sampling_params  # noqa: B018  (the knobs validate once, as SamplingParams)

    @property
    def sampling_params(self) -> SamplingParams:
        """The sampling knobs (temperature, top_k, top_p, min_p) as :class:`SamplingParams`."""
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )


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
        check_types(self)
        from gptjax.tokenizer import known_vocab_size

        tok_vocab = known_vocab_size(self.data.tokenizer)
        if tok_vocab is not None:
            check(
                self.model.vocab_size >= tok_vocab,
                f"model.vocab_size ({self.model.vocab_size}) is smaller than tokenizer "
                f"{self.data.tokenizer!r}'s vocabulary ({tok_vocab})",
            )
        check(
            self.optim.warmup_steps <= self.train.steps,
            f"optim.warmup_steps ({self.optim.warmup_steps}) is longer than training "
            f"(train.steps = {self.train.steps})",
        )
        check(
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
                check(not unknown, f"unknown field(s) {sorted(unknown)} in config section {key!r}")
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


# Presets, loading and overrides live in gptjax.recipes, sizes and FLOPs in gptjax.flops;
# their names stay importable from here. (After the classes: those modules import them.)
from gptjax.flops import flops_per_token, info, param_counts  # noqa: E402, F401
from gptjax.recipes import (  # noqa: E402, F401
    MODEL_PRESETS,
    RUN_PRESETS,
    _from_file,
    _with_model_preset,
    apply_overrides,
    gpt1,
    load_config,
    load_recipe,
    quickstart,
)
