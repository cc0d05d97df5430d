"""Hugging Face GPT-2 checkpoints in and out, without transformers at run time.

:func:`from_hf` reads a GPT-2 directory (``config.json`` plus ``model.safetensors``, its
sharded form, or ``pytorch_model.bin``) into a :class:`gptjax.Config` and the parameters
of a :class:`gptjax.GPT`; :func:`to_hf` writes a model as a directory that
``transformers.GPT2LMHeadModel.from_pretrained`` loads. :func:`import_hf` and
:func:`export_hf` do the same between run directories and are what the ``gptjax
import-hf`` / ``export-hf`` commands call.

The mapping is reshapes only. HF GPT-2 stores its projections as ``Conv1D`` weights in
``[in, out]`` layout, the layout of our kernels: ``c_attn.weight`` (D, 3D) is our
(D, 3, N, H), its bias (3D,) our (3, N, H), and ``attn.c_proj.weight`` (D, D) our
(N, H, D), since HF splits the 3D columns into q, k, v and each D into heads in that
order. Our block parameters are stacked over a leading layer axis; HF has one tensor per
block (``h.{i}.*``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.model import abstract as abstract_gpt
from gptjax.tokenizer import get_tokenizer
from gptjax.tree import param_names


def _hf_name(name: str) -> str:
    """HF's name for our parameter ``name`` (within a block for ``h.*``).

    ``ln_1.scale`` -> ``ln_1.weight``, ``attn.c_attn_bias`` -> ``attn.c_attn.bias``,
    ``mlp.c_fc`` -> ``mlp.c_fc.weight``, ``wte`` -> ``wte.weight``.
    """
    if name.endswith(".scale"):
        return name.removesuffix(".scale") + ".weight"
    if name.endswith("_bias"):
        return name.removesuffix("_bias") + ".bias"
    return name if name.endswith(".bias") else name + ".weight"


# HF's shape of one block's tensor, from ours: heads (and q/k/v) are merged into one axis.
_HF_SHAPES = {
    "attn.c_attn": lambda s: (s[0], math.prod(s[1:])),  # (D, 3, N, H) -> (D, 3D)
    "attn.c_attn_bias": lambda s: (math.prod(s),),  # (3, N, H) -> (3D,)
    "attn.c_proj": lambda s: (math.prod(s[:-1]), s[-1]),  # (N, H, D) -> (D, D)
}
# Attention-mask buffers that older hub checkpoints saved with the weights.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
# GPT-2 variants that transformers' GPT2Config can express and gptjax does not implement.
_GPT2_FLAGS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
_SAFETENSORS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def resolve(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub name (``gpt2``) fetched with huggingface_hub.

    Raises:
        GptjaxError: The name is neither a directory nor downloadable now (no
            huggingface_hub, offline, or no such model); the message says what to do.
    """
    path = Path(name_or_path)
    if path.is_file():
        raise GptjaxError(f"{str(path)!r} is a file: give the directory holding config.json and the weights")
    if path.is_dir():
        return path
    if path.is_absolute() or str(name_or_path).startswith(".") or str(name_or_path).count("/") > 1:
        raise GptjaxError(f"{str(path)!r} does not exist: give a Hugging Face GPT-2 directory or a hub name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GptjaxError(
            f"{str(name_or_path)!r} is not a directory: give a local Hugging Face GPT-2 directory "
            "(config.json and model.safetensors), or pip install huggingface_hub to fetch hub names"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        local = Path(
            snapshot_download(str(name_or_path), allow_patterns=_SAFETENSORS, local_files_only=offline)
        )
        if not any(local.glob("*.safetensors")):  # an old repository: PyTorch weights only
            patterns = ["config.json", "pytorch_model.bin"]
            local = Path(
                snapshot_download(str(name_or_path), allow_patterns=patterns, local_files_only=offline)
            )
    except Exception as e:  # network, auth and not-found errors come in many types
        why = f"{type(e).__name__}{', HF_HUB_OFFLINE is set' if offline else ''}"
        raise GptjaxError(
            f"{str(name_or_path)!r} is not a local directory and could not be fetched from the Hub "
            f"({why}): download it where there is network (hf download {name_or_path} --local-dir DIR) "
            "and pass that DIR"
        ) from e
    return local


def from_hf(path: str | Path, *, tokenizer: str = "gpt2") -> tuple[Config, nnx.State]:
    """Read a Hugging Face GPT-2 checkpoint as a gptjax config and parameters.

    The config is a fine-tuning recipe: the checkpoint's architecture with GPT-2's own
    dropouts (0.1 for the released models; set them to 0 to train without), ``tokenizer``,
    AdamW at a constant 3e-5 after 20 warmup steps (nanoGPT's fine-tuning rate), 500 steps
    of 8 sequences, and the name of the directory. Parameters are float32 whatever the
    file's dtype (fp16/bf16 weights convert exactly).

    Args:
        path: A directory with ``config.json`` and the weights, or a hub name (``gpt2``)
            when huggingface_hub is installed and online.
        tokenizer: The tokenizer the recipe records (GPT-2's BPE is tiktoken's ``gpt2``).

    Returns:
        ``(config, params)``: ``nnx.merge(nnx.split(GPT(config.model))[0], params)`` is the model.

    Raises:
        GptjaxError: Not a GPT-2 checkpoint, no weights, or tensors that do not fit config.json.
    """
    directory = resolve(path)
    model = _model_config(_read_hf_config(directory), directory)
    tensors = {}
    for key, value in _read_tensors(directory).items():
        name = key.removeprefix("transformer.")
        if not _BUFFER.fullmatch(name) and not (name == "lm_head.weight" and model.tie_embeddings):
            tensors[name] = value
    hint = f"config.json (n_layer={model.n_layer}, n_embd={model.n_embd}, vocab_size={model.vocab_size})"
    mismatch = "the weights and config do not match"

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise GptjaxError(f"{directory} has no tensor {key!r}, which its {hint} needs: {mismatch}")
        value = tensors.pop(key)
        if value.shape != shape:
            raise GptjaxError(
                f"{key!r} in {directory} has shape {value.shape}; its {hint} implies {shape}: {mismatch}"
            )
        return np.asarray(value, np.float32)

    def fill(name: str, abstract: jax.ShapeDtypeStruct) -> jax.Array:
        if not name.startswith("h."):
            return jnp.asarray(take(_hf_name(name), abstract.shape), abstract.dtype)
        block_name, per_layer = name[2:], abstract.shape[1:]
        hf_shape = _HF_SHAPES.get(block_name, tuple)(per_layer)
        layers = [take(f"h.{i}.{_hf_name(block_name)}", hf_shape) for i in range(model.n_layer)]
        return jnp.asarray(np.stack(layers).reshape(abstract.shape), abstract.dtype)

    params = _map_named(fill, _abstract_params(model))
    if tensors:
        extra = ", ".join(sorted(tensors)[:3]) + (", ..." if len(tensors) > 3 else "")
        raise GptjaxError(f"{directory} has tensors its {hint} does not account for ({extra}): {mismatch}")
    return _recipe(model, tokenizer, Path(str(path)).name or directory.resolve().name), params


def to_hf(model: GPT, path: str | Path, *, eos_token_id: int | None = None) -> Path:
    """Write ``model`` as a directory that ``GPT2LMHeadModel.from_pretrained`` loads.

    Writes ``config.json`` (:func:`hf_config`) and ``model.safetensors``
    (:func:`hf_state_dict`, named as transformers' ``save_pretrained`` names them).

    Args:
        model: A GPT with learned positions (HF GPT-2 has no rotary embeddings).
        path: The directory to write; created if needed, existing files replaced.
        eos_token_id: End-of-text, recorded as the config's bos/eos token (50256 for gpt2).

    Returns:
        The directory.

    Raises:
        GptjaxError: The model's config is not one GPT-2 can express.
    """
    from safetensors.numpy import save_file

    cfg = model.config
    if cfg.position != "learned":
        raise GptjaxError(
            f"only GPT-2-compatible models can be exported: position={cfg.position!r}, but HF GPT-2 has "
            "learned positions only (train with model.position=learned)"
        )
    tensors = hf_state_dict(model)
    from gptjax.runs import ensure_dir

    directory = ensure_dir(path)
    if (directory / "checkpoints").exists() or (directory / "metrics.jsonl").exists():
        raise GptjaxError(f"{str(directory)!r} holds a gptjax run; export into another directory")
    for stale in directory.glob(".tmp-*"):  # left by an export that was killed
        stale.unlink(missing_ok=True)
    temporary = directory / f".tmp-{os.getpid()}-model.safetensors"
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode every other file here gets (0644).
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod(0o666 & ~umask)
    os.replace(temporary, directory / "model.safetensors")  # never a half-written file in place
    (directory / "config.json").write_text(
        json.dumps(hf_config(cfg, eos_token_id=eos_token_id), indent=2) + "\n"
    )
    return directory


def hf_state_dict(model: GPT | nnx.State | Mapping, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """The tensors of HF's ``GPT2LMHeadModel`` (its names, float32) holding ``model``'s weights.

    Args:
        model: A GPT, or its parameters (``nnx.State`` or ``nnx.to_pure_dict``'s nested dicts).
        cfg: The parameters' model config (a GPT brings its own).

    A model without biases gets zero biases, which computes the same function.
    """
    if isinstance(model, GPT):
        model, cfg = nnx.state(model, nnx.Param), model.config
    if cfg is None:
        raise TypeError("hf_state_dict needs cfg when given parameters, not a GPT")
    ours = {name: np.asarray(value, np.float32) for name, value in _named_leaves(model)}
    tensors = {}
    for name, abstract in _named_leaves(_abstract_params(dataclasses.replace(cfg, bias=True))):
        value = ours.get(name, np.zeros(abstract.shape, np.float32))
        if name.startswith("h."):
            hf_shape = _HF_SHAPES.get(name[2:], tuple)(abstract.shape[1:])
            for i in range(cfg.n_layer):
                hf_name = f"transformer.h.{i}.{_hf_name(name[2:])}"
                tensors[hf_name] = np.ascontiguousarray(value[i].reshape(hf_shape))
        else:  # HF's head sits outside its "transformer" module
            tensors[("" if name == "lm_head" else "transformer.") + _hf_name(name)] = value
    return tensors


def hf_config(cfg: ModelConfig, *, eos_token_id: int | None = None) -> dict:
    """The ``config.json`` of HF GPT-2 for ``cfg`` (``GPT2Config.from_dict`` reads it)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None if cfg.mlp_ratio == 4 else cfg.mlp_ratio * cfg.n_embd,
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "embd_pdrop": cfg.embd_dropout,
        "attn_pdrop": cfg.attn_dropout,
        "resid_pdrop": cfg.resid_dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "initializer_range": 0.02,
        "dtype": "float32",
    }


def import_hf(source: str | Path, run_dir: str | Path, *, tokenizer: str = "gpt2") -> Path:
    """Convert a HF GPT-2 directory (or hub name) into a run that load/sample/init_from accept."""
    from gptjax.runs import write_params_run

    get_tokenizer(tokenizer)  # an unknown name fails now, not when the run is first used
    config, params = from_hf(source, tokenizer=tokenizer)
    return write_params_run(run_dir, config, params, tokenizer=tokenizer)


def export_hf(run_dir: str | Path, hf_dir: str | Path) -> Path:
    """Write the latest checkpoint of a run as a HF GPT-2 directory (see :func:`to_hf`),
    with the run's tokenizer as GPT-2 vocab files where that format can express it (the
    byte tokenizer and ``gpt2``; ``GPT2TokenizerFast.from_pretrained`` then encodes as
    the run does; other encodings leave no tokenizer files)."""
    from gptjax.runs import load

    model, _, tokenizer = load(run_dir)
    path = to_hf(model, hf_dir, eos_token_id=tokenizer.eot_id)
    if not tokenizer.save_hf(path, model_max_length=model.config.block_size):
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"):
            (path / name).unlink(missing_ok=True)  # an earlier export's, not this run's
    return path


# --------------------------------------------------------------------------------------


def _read_hf_config(directory: Path) -> dict:
    file = directory / "config.json"
    if not file.is_file():
        raise GptjaxError(f"{directory} has no config.json: give a directory written by save_pretrained")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise GptjaxError(f"{file} is not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(hf, dict):
        raise GptjaxError(
            f"{file} holds a JSON {type(hf).__name__}, not a JSON object: is it a GPT-2 config?"
        )
    return hf


def _model_config(hf: dict, directory: Path) -> ModelConfig:
    # Missing fields take GPT2Config's defaults, as transformers does.
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise GptjaxError(
            f"{directory} holds a {model_type!r} model, not GPT-2: only model_type 'gpt2' imports"
        )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise GptjaxError(
            f"{directory}: activation_function {activation!r} is not one of {sorted(_ACTIVATIONS)}"
        )
    for flag, gpt2_value in _GPT2_FLAGS.items():
        if hf.get(flag, gpt2_value) != gpt2_value:
            raise GptjaxError(f"{directory}: {flag}={hf[flag]} is a GPT-2 variant gptjax does not implement")
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "n_inner"):
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise GptjaxError(f"{directory}: config.json's {key} ({value!r}) must be an integer")
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner") or 4 * n_embd
    if n_inner % n_embd:
        raise GptjaxError(
            f"{directory}: n_inner ({n_inner}) must be a multiple of n_embd ({n_embd}) in gptjax"
        )
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        mlp_ratio=n_inner // n_embd,
        embd_dropout=hf.get("embd_pdrop", 0.1),
        attn_dropout=hf.get("attn_pdrop", 0.1),
        resid_dropout=hf.get("resid_pdrop", 0.1),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation=_ACTIVATIONS[activation],
    )


def _read_tensors(directory: Path) -> dict[str, np.ndarray | jax.Array]:
    from safetensors.flax import load_file as load_to_device  # numpy has no bfloat16

    def load_file(file: Path) -> dict[str, jax.Array]:
        from safetensors import SafetensorError

        try:
            with jax.default_device(jax.devices("cpu")[0]):
                return load_to_device(file)
        except (SafetensorError, OSError) as e:
            raise GptjaxError(
                f"{file} is not a readable safetensors file ({e}): download or convert it again"
            ) from e

    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or no weight map
            raise GptjaxError(
                f"{index} is not a safetensors index ({type(e).__name__}: {e}): download it again"
            ) from e
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise GptjaxError(
                f"{directory} has only pytorch_model.bin, which needs torch to read: pip install torch, "
                "or convert it to model.safetensors"
            ) from None
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
    raise GptjaxError(
        f"{directory} has no weights: expected model.safetensors (or pytorch_model.bin) beside config.json"
    )


def _recipe(model: ModelConfig, tokenizer: str, name: str) -> Config:
    return Config(
        name=name,
        model=model,
        data=DataConfig(tokenizer=tokenizer),
        optim=OptimConfig(lr=3e-5, min_lr=3e-5, schedule="constant", warmup_steps=20),
        train=TrainConfig(steps=500, batch_size=8, eval_every=100, eval_max_batches=50, checkpoint_every=100),
    )


def _abstract_params(cfg: ModelConfig) -> nnx.State:
    return abstract_gpt(cfg)[1].filter(nnx.Param)


def _path_name(path) -> str:
    return ".".join(param_names(path))


def _named_leaves(state: nnx.State) -> list[tuple[str, jax.Array]]:
    return [(_path_name(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def _map_named(fn, state: nnx.State) -> nnx.State:
    return jax.tree_util.tree_map_with_path(lambda p, leaf: fn(_path_name(p), leaf), state)
