"""Sizes and FLOPs of a model, computed from its config (the tests check them against the
model): parameter counts, training FLOPs per token, and what ``gptjax info`` prints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gptjax.config import Config, ModelConfig


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
