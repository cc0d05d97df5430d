"""Fine-tuning's model and optimizer: the grown GPT, the task head and loss, which entries
train when (freezing, gradual unfreezing) and at what rate (per-layer discriminative rates),
and GPT-1's per-group AdamW. :mod:`gptjax.finetune` runs them on the trainer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax import layers
from gptjax.config import OptimConfig
from gptjax.model import GPT, abstract
from gptjax.optim import group_adamw, lr_schedule, weight_decay_mask
from gptjax.tree import param_names

SPECIAL_TOKENS = ("start", "delim", "extract")


# --------------------------------------------------------------------------------------
# Model: the grown GPT and the head


def grow_vocab(model: GPT, n_new: int, key: jax.Array) -> GPT:
    """The model with ``n_new`` embedding rows appended, initialised normal(0, 0.02)."""
    cfg = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + n_new)
    graphdef, _ = abstract(cfg)
    state = jax.tree.map(lambda x: x, nnx.state(model))  # a copy: the source model is untouched
    for name, k in zip(("wte", "lm_head"), jax.random.split(key), strict=True):
        if name in state:
            table = state[name][...]
            rows = 0.02 * jax.random.normal(k, (n_new, table.shape[1]), table.dtype)
            state[name] = state[name].replace(jnp.concatenate([table, rows]))
    return nnx.merge(graphdef, state)


def init_head(n_embd: int, n_out: int, key: jax.Array) -> dict:
    """The task head ``W (D, n_out)``, normal(0, 0.02), and zero bias ``b (n_out,)``."""
    return {"w": 0.02 * jax.random.normal(key, (n_embd, n_out), jnp.float32), "b": jnp.zeros((n_out,))}


def head_logits(
    model: GPT, head: dict, tokens, extract_at, task: str, dropout: float = 0.0, dropout_key=None
):
    """Task logits and hidden states.

    Args:
        tokens: (B, K, T) sequences: K = 1 (classification, entailment), 2 (similarity,
            both orders) or C choices.
        extract_at: (B, K) position of each sequence's extract token.
        dropout: Dropout rate on the classifier's input (GPT-1: 0.1); the body uses the
            model config's rates. Both only with a ``dropout_key``.

    Returns:
        ``(logits, hidden)``: logits (B, n_classes), or (B, C) choice scores for multiple
        choice; hidden (B * K, T, D).
    """
    b, k, t = tokens.shape
    k_body, k_head = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    hidden = model.hidden(tokens.reshape(b * k, t), dropout_key=k_body)  # (BK, T, D)
    at = jnp.take_along_axis(hidden, extract_at.reshape(b * k, 1, 1), axis=1)[:, 0]  # (BK, D)
    at = layers.dropout(at.reshape(b, k, -1).astype(jnp.float32), dropout, k_head)
    if task == "similarity":
        at = at.sum(1, keepdims=True)
    scores = jnp.einsum("BKD,DO->BKO", at, head["w"]) + head["b"]
    logits = scores[..., 0] if task == "multiple_choice" else scores[:, 0]
    return logits, hidden


def make_loss_fn(graphdef: nnx.GraphDef, task: str, aux_lm_weight: float, dropout: float = 0.0):
    """``(params, head, batch, dropout_key=None) -> (L3, (L2, L1, logits))``; L1 is 0 when lambda is 0."""

    def loss_fn(params, head, batch, dropout_key=None):
        return _loss(nnx.merge(graphdef, params), head, batch, dropout_key, task, aux_lm_weight, dropout)

    return loss_fn


def _loss(model, head, batch, dropout_key, task, aux_lm_weight, dropout):
    tokens, lengths, valid = batch["tokens"], batch["lengths"], batch["valid"]  # (B, K, T), (B, K) x2
    logits, hidden = head_logits(model, head, tokens, jnp.maximum(lengths - 1, 0), task, dropout, dropout_key)
    if task == "multiple_choice":
        logits = jnp.where(valid, logits, -1e9)
    task_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    lm_loss = jnp.zeros(())
    if aux_lm_weight > 0:
        t = tokens.shape[-1]
        lm_logits = model.logits(hidden[:, :-1])  # (BK, T-1, V)
        targets = tokens.reshape(-1, t)[:, 1:]
        weights = (jnp.arange(1, t)[None, :] < lengths.reshape(-1, 1)) & valid.reshape(-1, 1)
        nll = optax.softmax_cross_entropy_with_integer_labels(lm_logits, targets)
        lm_loss = (nll * weights).sum() / jnp.maximum(weights.sum(), 1)
    return task_loss + aux_lm_weight * lm_loss, (task_loss, lm_loss, logits)


def trainable_mask(params: nnx.State, step: jax.Array, cfg, n_layer: int, base_vocab: int):
    """Which body entries may change at ``step`` (booleans broadcastable to each parameter).

    Frozen body: only the special-token rows. Gradual unfreezing: layer ``i`` trains once
    ``1 + step // unfreeze_every > n_layer - 1 - i`` (top first, with ln_f and an untied
    LM head); the embeddings once every layer does. The special-token rows always train.
    """
    if cfg.freeze_body:
        n_open = jnp.zeros((), jnp.int32)
    elif cfg.unfreeze_every:
        n_open = jnp.minimum(n_layer, 1 + step // cfg.unfreeze_every)
    else:
        n_open = jnp.full((), n_layer, jnp.int32)
    layer_open = jnp.arange(n_layer) >= n_layer - n_open  # (L,)
    all_open = n_open == n_layer
    return _by_group(params, n_layer, base_vocab, layer_open, n_open > 0, all_open, True)


def peak_lrs(params: nnx.State, cfg, n_layer: int, base_vocab: int):
    """Each entry's peak learning rate: ``body_lr / layer_lr_decay ** depth`` for the body,
    depth counted from the top layer (0; ln_f and an untied LM head with it) down to the
    embeddings (n_layer), as ULMFiT's discriminative rates; ``head_lr`` for the new rows."""
    depth = jnp.arange(n_layer - 1, -1, -1, dtype=jnp.float32)  # (L,): top layer 0
    layer_lr = cfg.body_lr / cfg.layer_lr_decay**depth
    bottom = cfg.body_lr / cfg.layer_lr_decay**n_layer
    return _by_group(params, n_layer, base_vocab, layer_lr, cfg.body_lr, bottom, cfg.head_lr)


def _by_group(params, n_layer, base_vocab, per_layer, top, bottom, new_rows):
    """A tree like ``params`` of values broadcastable to each leaf: ``per_layer`` (L,) for
    the blocks, ``top`` for ln_f and the LM head, ``bottom`` for the embeddings, and
    ``new_rows`` for the special-token rows of wte (and of an untied LM head)."""

    def rows(leaf, old):
        new = jnp.arange(leaf.shape[0]) >= base_vocab
        return jnp.where(new, jnp.asarray(new_rows), jnp.asarray(old))[:, None]

    def decide(path, leaf):
        name = param_names(path)[0]
        if name == "h":
            return jnp.asarray(per_layer).reshape((n_layer,) + (1,) * (leaf.ndim - 1))
        if name == "lm_head":
            return rows(leaf, top)
        if name == "wte":
            return rows(leaf, bottom)
        return jnp.asarray(top if name == "ln_f" else bottom)  # wpe with the embeddings

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg, total_steps: int, params: nnx.State, head: dict):
    """Per-group AdamW over ``(body, head)``: per-layer rates and per-group Adam counts.

    GPT-1's schedule (linear warmup over 0.2% of the steps, linear decay to 0) multiplies
    every group's peak rate; a group that gradual unfreezing opens late starts its own
    Adam count then (:func:`gptjax.optim.group_adamw`).
    """
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    base_vocab = params["wte"].shape[0] - len(SPECIAL_TOKENS)
    optim = _optim(cfg, total_steps)
    schedule = lr_schedule(optim, total_steps)
    head_true = jax.tree.map(lambda _: True, head)
    return group_adamw(
        lambda step: schedule(step) / optim.lr,
        (peak_lrs(params, cfg, n_layer, base_vocab), jax.tree.map(lambda _: cfg.head_lr, head)),
        lambda step: (trainable_mask(params, step, cfg, n_layer, base_vocab), head_true),
        (weight_decay_mask(params), {"w": True, "b": False}),
        b1=optim.beta1,
        b2=optim.beta2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def _optim(cfg, total_steps: int) -> OptimConfig:
    """GPT-1's fine-tuning optimizer: Adam (0.9, 0.999), warmup 0.2%, linear decay to 0."""
    return OptimConfig(
        lr=cfg.body_lr,
        min_lr=0.0,
        schedule="wsd",
        decay_fraction=1.0,
        warmup_steps=max(1, round(0.002 * total_steps)),
        beta2=0.999,
        weight_decay=cfg.weight_decay,
        grad_clip=0.0,
    )


def make_eval_step(graphdef, task: str):
    """``(params, head, batch) -> (summed task loss, correct count, predictions)`` over real rows."""
    loss_fn = make_loss_fn(graphdef, task, 0.0)

    def eval_step(params, head, batch):
        logits = loss_fn(params, head, batch)[1][2]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        w = batch["weight"]
        predictions = logits.argmax(-1)
        return (nll * w).sum(), ((predictions == batch["labels"]) * w).sum(), predictions

    return eval_step
