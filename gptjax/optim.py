"""Optimisation: the learning-rate schedule, AdamW for pretraining, per-group AdamW for
fine-tuning, and what a skipped (non-finite) step keeps.

Every optimizer here updates the pair ``(params, head)`` that the trainer differentiates:
``params`` is the GPT's state, ``head`` what a task adds outside it (a classifier; ``()``
for language modelling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax.config import OptimConfig
from gptjax.tree import param_names

# Parameters that weight decay applies to: the weight matrices. Embeddings join them when
# ``optim.decay_embeddings`` is set; biases and LayerNorm parameters never do.
_MATRICES = ("c_attn", "c_proj", "c_fc", "lm_head")
_EMBEDDINGS = ("wte", "wpe")


def lr_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate at each step (0-based), built from optax's schedules.

    Linear warmup from 0 at step 0 to ``lr`` at step ``warmup_steps``; then ``cosine``
    decays to ``min_lr`` at the last step (``total_steps - 1``), ``constant`` stays at
    ``lr``, and ``wsd`` holds ``lr`` until the last ``decay_fraction`` of the steps and
    decays linearly to ``min_lr`` at the last step.
    """
    lr, floor, warmup = optim.lr, optim.min_lr, optim.warmup_steps
    last = max(total_steps - 1, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(last - warmup, 1), alpha=floor / lr)
    elif optim.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:  # wsd
        decay_start = max(warmup, round(total_steps * (1 - optim.decay_fraction)))
        decay = optax.linear_schedule(lr, floor, max(last - decay_start, 1))
        after = optax.join_schedules([optax.constant_schedule(lr), decay], [decay_start - warmup])
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def weight_decay_mask(params: nnx.State, decay_embeddings: bool = False):
    """True for the parameters weight decay applies to (see ``_MATRICES``)."""
    names = _MATRICES + (_EMBEDDINGS if decay_embeddings else ())

    return jax.tree_util.tree_map_with_path(lambda path, _: param_names(path)[-1] in names, params)


def make_optimizer(optim: OptimConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    """Pretraining's AdamW (clipped) over ``(params, head)``; its state is that of ``params``."""
    adamw = optax.adamw(
        lr_schedule(optim, total_steps),
        b1=optim.beta1,
        b2=optim.beta2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=weight_decay_mask(params, optim.decay_embeddings),
    )
    if optim.grad_clip > 0:
        adamw = optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return _params_only(adamw)


def _params_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to the ``params`` half of ``(params, head)`` with an empty head.

    The state is ``inner``'s on ``params`` alone, so checkpoints keep their layout.
    """

    def init(trainable):
        return inner.init(trainable[0])

    def update(updates, state, trainable=None):
        params = None if trainable is None else trainable[0]
        new, state = inner.update(updates[0], state, params)
        return (new, updates[1]), state

    return optax.GradientTransformation(init, update)


def keep_moments(finite: jax.Array, new: optax.OptState, old: optax.OptState) -> optax.OptState:
    """``new`` where the step was finite, else ``old``, except the schedules' step counts.

    A skipped step still advances ``state.step``, so the schedules advance with it: the
    optimizer's schedule count is always ``state.step`` and the logged lr is the applied one.
    """
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    pick = lambda n, o: n if is_schedule(n) else jnp.where(finite, n, o)
    return jax.tree.map(pick, new, old, is_leaf=is_schedule)


# --------------------------------------------------------------------------------------
# Per-group AdamW (fine-tuning)


class GroupAdamState(NamedTuple):
    """Adam's moments with a step count per parameter group (broadcastable per leaf)."""

    count: Any  # per leaf: int32, shaped like that leaf's group mask (e.g. (L, 1, ...) per layer)
    mu: Any
    nu: Any
    schedule: optax.ScaleByScheduleState  # the global step (advances on skipped steps too)


def group_adamw(
    schedule: Callable[[jax.Array], jax.Array],
    peak_lr: Any,
    trainable: Callable[[jax.Array], Any],
    decay: Any,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
) -> optax.GradientTransformation:
    """AdamW whose groups open at different steps, each with its own Adam count.

    Args:
        schedule: ``step -> factor`` multiplying every peak rate (warmup and decay).
        peak_lr: A tree like the parameters of peak rates, each broadcastable to its leaf
            (per layer, per embedding row, per group).
        trainable: ``step -> tree of booleans`` broadcastable to each leaf: which entries
            train at that step. A closed entry gets a zero update and keeps its moments.
        decay: A tree of booleans: where decoupled weight decay applies.

    A group opened at step s starts with zero moments *and* a zero count, so its first
    update has Adam's bias correction for one step (a shared count would correct it as if
    it had s steps of history: updates 1/sqrt(1 - b2^s)-times too large).
    """

    def init(params):
        masks = jax.tree.leaves(trainable(jnp.zeros((), jnp.int32)))
        count = [jnp.zeros(jnp.shape(m), jnp.int32) for m in masks]  # plain arrays: replicated
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return GroupAdamState(count, zeros(), zeros(), optax.ScaleByScheduleState(jnp.zeros((), jnp.int32)))

    def update(grads, state, params):
        step = state.schedule.count
        factor = schedule(step)
        treedef = jax.tree.structure(grads)
        columns = [jax.tree.leaves(t) for t in (grads, state.mu, state.nu, params)]
        columns += [state.count] + [jax.tree.leaves(t) for t in (trainable(step), peak_lr, decay)]

        def one(g, m, v, p, c, is_open, lr, wd):
            is_open = jnp.asarray(is_open)
            c = c + is_open.astype(jnp.int32)
            m = jnp.where(is_open, b1 * m + (1 - b1) * g, m)
            v = jnp.where(is_open, b2 * v + (1 - b2) * jnp.square(g), v)
            t = jnp.maximum(c, 1).astype(jnp.float32)
            u = (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
            u = u + jnp.where(wd, weight_decay, 0.0) * p
            return jnp.where(is_open, -lr * factor * u, 0).astype(p.dtype), m, v, c

        updates, mu, nu, count = zip(*(one(*xs) for xs in zip(*columns, strict=True)), strict=True)
        tree = lambda leaves: jax.tree.unflatten(treedef, leaves)
        new_state = GroupAdamState(list(count), tree(mu), tree(nu), optax.ScaleByScheduleState(step + 1))
        return tree(updates), new_state

    return optax.GradientTransformation(init, update)
