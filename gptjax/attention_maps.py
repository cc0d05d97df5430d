"""Attention maps: every head's attention probabilities of one layer, drawn as heat maps.

The probabilities come from the model's own forward pass (``model(tokens, attention=True)``),
which then takes the plain softmax path in every layer instead of a fused kernel.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import GptjaxError
from gptjax.model import GPT


class AttentionMaps(NamedTuple):
    """What :func:`attention_maps` returns."""

    probs: np.ndarray  # (N, T, T): row t is query t's distribution over keys
    labels: list[str]  # one per token
    path: Path | None  # the PNG


def attention_probs(model: GPT, tokens: jax.Array, layer: int) -> jax.Array:
    """Attention probabilities (B, N, T, T) of block ``layer`` for tokens (B, T), in float32."""
    n_layer, block_size = model.config.n_layer, model.config.block_size
    if not 0 <= layer < n_layer:
        raise GptjaxError(f"layer {layer} does not exist: the model has layers 0..{n_layer - 1}")
    if tokens.shape[1] > block_size:
        raise GptjaxError(
            f"the prompt has {tokens.shape[1]} tokens, more than the model's block_size ({block_size})"
        )
    return model(tokens, attention=True)[1][layer]


def token_labels(tokenizer, tokens: list[int]) -> list[str]:
    """Each token decoded alone, with whitespace made visible (``␣``, ``\\n``, ``\\t``)."""
    labels = []
    for token in tokens:
        text = tokenizer.decode([token])
        text = text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        # Other control characters have no glyph (matplotlib fails on them): show their code.
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
        labels.append(text if text else f"<{token}>")
    return labels


def plot_attention(probs: np.ndarray, labels: list[str], out: str | Path, title: str = "") -> Path:
    """Draw (N, T, T) probabilities as a grid of N heat maps with token labels; write a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    n, t, _ = probs.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size = max(3.0, 0.16 * t + 1.0)
    fig = Figure(figsize=(cols * size, rows * size + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    fontsize = max(4, min(9, 240 // max(t, 1)))
    for head, ax in enumerate(axes):
        if head >= n:
            ax.axis("off")
            continue
        image = ax.imshow(probs[head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=9)
        style = dict(fontsize=fontsize, fontfamily="monospace", parse_math=False)  # "$" is a token
        ax.set_xticks(range(t), labels, rotation=90, **style)
        ax.set_yticks(range(t), labels, **style)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=list(axes[:n]), shrink=0.6, label="attention probability")
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def attention_maps(
    run_dir: str | Path, prompt: str, layer: int, out: str | Path | None = None
) -> AttentionMaps:
    """Load a run, compute layer ``layer``'s attention for ``prompt`` and (if ``out``) plot it."""
    from gptjax.runs import load
    from gptjax.validate import image_path

    if out is not None:
        out = image_path(out)
    model, _, tokenizer = load(run_dir)
    tokens = tokenizer.encode(prompt)
    if not tokens:
        raise GptjaxError("the prompt is empty: give --prompt TEXT")
    probs = np.asarray(attention_probs(model, jnp.asarray([tokens], jnp.int32), layer)[0])
    labels = token_labels(tokenizer, tokens)
    path = None
    if out is not None:
        path = plot_attention(probs, labels, out, title=f"{Path(run_dir).name}: layer {layer}")
    return AttentionMaps(probs, labels, path)
