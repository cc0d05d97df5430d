"""The CPU-only decode path: per-layer copies of the weights (kernels rows first) and of
the KV cache, which :meth:`gptjax.model.GPT.decode` unrolls over.

Why it exists: XLA:CPU copies each layer's weights and cache when a scan slices them out of
their stacks, at every token, which is most of a token's time at batch 1. TPU and GPU run
the stacked ``lax.scan`` path. :func:`enabled` decides; ``GPTJAX_DECODE=stacked`` forces
the stacked path on CPU (the tests run the sampler both ways).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.model import GPT, KVCache


def enabled() -> bool:
    """Whether the sampler decodes with per-layer copies: on CPU, unless told otherwise."""
    return jax.default_backend() == "cpu" and os.environ.get("GPTJAX_DECODE", "") != "stacked"


def per_layer(cache: KVCache) -> KVCache:
    """The same cache with k and v as tuples of per-layer (B*N, S, H) arrays (copies).

    Three axes, not four: at batch 1 XLA:CPU drops the unit axis of a (1, N, S, H) cache
    with a bitcast between the in-place update and the attention matmul, and then copies
    every layer's cache at every token (5 ms a token for gpt2 at 128 slots).
    """
    n_layer, b, n, s, h = cache.k.shape
    shape = (n_layer, b * n, s, h)
    return cache._replace(k=tuple(cache.k.reshape(shape)), v=tuple(cache.v.reshape(shape)))


def layer_states(model: GPT) -> list[nnx.State]:
    """Each block's parameters sliced off the stacked state (copies), for ``GPT.decode``.

    Kernels are stored rows-first (:func:`_rows_first`): a one-token matmul then reads
    each output's weights contiguously, 5-20% faster on CPU at batch 1 and 8.
    """
    stacked = nnx.state(model.h)

    def layer(v: nnx.Variable, i: int) -> nnx.Variable:
        axes = v.get_metadata()["axes"][1:]  # without "layers"
        if v.ndim < 3 or "embed" not in (axes[0], axes[-1]):
            return v.replace(v[i], axes=axes)
        return v.replace(_rows_first(axes, v[i]), axes=axes, rows_first=True)

    is_variable = lambda x: isinstance(x, nnx.Variable)
    layers = range(model.config.n_layer)
    return [jax.tree.map(lambda v, i=i: layer(v, i), stacked, is_leaf=is_variable) for i in layers]


def _rows_first(axes: tuple, kernel: jax.Array) -> jax.Array:
    """A kernel (*inputs, *outputs) stored (*outputs, *inputs), for ``model._matmul``.

    Every kernel here has ``embed`` either as its first axis (it reads the residual
    stream: one input axis) or its last (it writes it: one output axis), so moving that
    axis to the other end puts the outputs first.
    """
    return jnp.moveaxis(kernel, 0, -1) if axes[0] == "embed" else jnp.moveaxis(kernel, -1, 0)
