"""The jitted steps: pure functions of explicit state, built once per run.

``(state, batch) -> (state, metrics)`` differentiates a task's loss with respect to the
pair ``(params, head)`` (the GPT's parameters and what the task adds outside it), with
micro-batch accumulation, and skips a non-finite step; the eval step sums weighted NLL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax.config import Config
from gptjax.model import GPT
from gptjax.optim import keep_moments, lr_schedule


class TrainState(NamedTuple):
    step: jax.Array  # () int32: updates applied so far
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # (2,) uint32: key data of the base dropout key
    head: Any = ()  # what a task adds outside the GPT (a classifier); () for language modelling


class Task(NamedTuple):
    """What the trainer optimises: its hooks. Language modelling on ``config.data`` is one
    (:func:`gptjax.train.language_model`); fine-tuning (:mod:`gptjax.finetune`) is another, so it runs
    this loop with its sharded step, bitwise resume, SIGTERM saves and skipped bad steps.

    Attributes:
        loss: ``(model, head, batch, dropout_key | None) -> (loss, metrics)`` of one
            (micro-)batch; the metrics (scalars) are averaged over micro-batches and logged.
        init_head: ``key -> head``, what the task adds outside the GPT (jittable; ``()``).
        optimizer: ``(abstract params, abstract head, total steps) -> GradientTransformation``
            over the pair ``(params, head)``.
        lr: ``step -> learning rate`` that is logged.
        initialise: ``(state, setup) -> state``: a new run's first state (pretrained
            weights), or None.
        batches: ``batch(step)`` and ``prefetch(start, stop, depth)`` as
            :class:`gptjax.data.TrainBatches`: this process's batch (a pytree) at a step.
        evaluate: ``(setup, params, head, final=False) -> {"val_...": value}``; ``final``
            at the end of a run (a full pass where the periodic one is partial).
        after_eval: ``(step, val metrics) -> True to stop there`` (early stopping), or None.
        best: ``val metrics -> sort key`` (lowest is best) of the checkpoint kept as best,
            or None for the lowest ``val_loss``.
        tokens_per_step: Tokens in one global batch (throughput, MFU).
        meta: Saved with each checkpoint besides the config (``tokenizer``, task records).
        tokenizer: For samples (language modelling) and the run's record.
        setup_key: Hashable, or None: tasks with equal keys have the same loss, head and
            optimizer for equal model and optimizer configs, so the trainer reuses the
            jitted steps it built for one in the next (no retrace, no recompile).
    """

    loss: Callable
    init_head: Callable
    optimizer: Callable
    lr: Callable
    initialise: Callable | None = None
    batches: Any = None
    evaluate: Callable | None = None
    after_eval: Callable | None = None
    best: Callable | None = None
    tokens_per_step: int = 0
    meta: dict | None = None
    tokenizer: Any = None
    setup_key: Any = None


def lm_loss(model: GPT, head, tokens: jax.Array, dropout_key=None):
    """Mean next-token cross-entropy of tokens (B, T+1); language modelling has no head."""
    logits = model(tokens[:, :-1], dropout_key=dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), {}


# --------------------------------------------------------------------------------------
# Steps


def make_grad_fn(graphdef: nnx.GraphDef, config: Config, loss=lm_loss):
    """``((params, head), batch, key) -> ((mean loss, metrics), mean gradients)`` over the batch.

    With ``optim.accum_steps = k`` the batch runs as k micro-batches in a ``lax.scan``
    whose summed gradients, divided by k, are the big batch's (equal-size micro-batches).
    """

    def loss_fn(trainable, batch, dropout_key):
        params, head = trainable
        return loss(nnx.merge(graphdef, params), head, batch, dropout_key)

    loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    m = config.model
    uses_dropout = max(m.embd_dropout, m.attn_dropout, m.resid_dropout) > 0
    k = config.optim.accum_steps

    def grad_fn(trainable, batch, key):
        if k == 1:
            return loss_and_grad(trainable, batch, key if uses_dropout else None)
        # Row j*k + i goes to micro-batch i, so each micro-batch stays spread over every
        # data-parallel device.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, xs):
            tokens, i = xs
            result = loss_and_grad(trainable, tokens, jax.random.fold_in(key, i) if uses_dropout else None)
            return jax.tree.map(jnp.add, carry, result), None

        shapes = jax.eval_shape(loss_and_grad, trainable, jax.tree.map(lambda x: x[0], micro), key)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        total = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(k)))[0]
        return jax.tree.map(lambda x: x / k, total)

    return grad_fn


def make_train_step(graphdef: nnx.GraphDef, optimizer, config: Config, loss=lm_loss, lr=None):
    """``(state, batch) -> (state, metrics)``.

    A non-finite loss, gradient or updated parameter norm skips the update: parameters
    and optimizer moments stay as they were, the step still advances (it indexes the data
    and the schedule), and ``metrics["skipped"]`` is 1. ``loss`` and ``lr`` (the logged rate) default to
    language modelling's.
    """
    grad_fn = make_grad_fn(graphdef, config, loss)
    lr = lr or lr_schedule(config.optim, config.train.steps)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        trainable = (state.params, state.head)
        (loss, aux), grads = grad_fn(trainable, batch, key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params, head = optax.apply_updates(trainable, updates)
        finite &= jnp.isfinite(optax.tree.norm((params, head)))  # an update can blow up finite gradients
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": grad_norm,
            "lr": lr(state.step),
            "skipped": 1 - finite,
        }
        new_state = TrainState(
            state.step + 1,
            keep(params, state.params),
            keep_moments(finite, opt_state, state.opt_state),
            state.rng,
            keep(head, state.head),
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    """``(params, tokens (B, T+1), weights (B, T)) -> (sum of weighted NLL, sum of weights)``."""

    def eval_step(params, tokens, weights):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return (nll * weights).sum(), weights.sum()

    return eval_step
