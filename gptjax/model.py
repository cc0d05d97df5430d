"""The GPT model in Flax NNX: embeddings, causal attention with a KV-cache path, MLP, head.

Shapes use one set of letters: B batch, T time (query positions), S cache slots (key
positions), D model width, N heads, H head dim, F MLP width, V vocabulary, L layers.

Every parameter carries a logical ``axes`` tuple (``vocab``, ``embed``, ``heads``,
``mlp``, ``layers``...) that :mod:`gptjax.sharding` maps onto mesh axes. Block parameters
are always stacked over a leading ``layers`` axis; ``scan_layers`` only decides whether
the forward pass runs them with ``lax.scan`` or an unrolled Python loop, so one checkpoint
serves both.

Randomness is explicit: dropout is active exactly when a ``dropout_key`` is passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.layers import (  # noqa: F401  (Block, Attention... stay importable from here)
    BTD,
    MLP,
    Attention,
    Block,
    LayerNorm,
    attention_implementation,
    dropout,
    init_param,
    param_value,
    rope,
)
from gptjax.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of left-padded sequences.

    Attributes:
        k: (L, B, N, S, H) keys, in the compute dtype (heads before slots, so attention
            contracts them without transposing the cache), or a tuple of L per-layer
            (B*N, S, H) arrays (:func:`gptjax.cpu_decode.per_layer`, for :meth:`GPT.decode`
            with ``layers``).
        v: (L, B, N, S, H) values, or their per-layer tuple.
        start: (B,) the first real (non-padding) slot of each row; its position is 0.
        index: () the slot the next token is written to.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    start: jax.Array
    index: jax.Array


def remat_policy(cfg: ModelConfig) -> str:
    """``none``, ``full`` or ``dots``: what ``cfg.remat`` resolves to on the current backend.

    ``auto`` is ``dots`` on CPU, where recomputing a block's elementwise work in the
    backward pass is cheaper than stashing it per layer (the train step is 1.2-1.4x
    faster at the quick-start and gpt2 shapes, ``scripts/bench_train.py``), and ``none``
    on accelerators, where it costs recomputation that memory does not ask for.
    """
    if cfg.remat != "auto":
        return cfg.remat
    return "dots" if jax.default_backend() == "cpu" else "none"


class GPT(nnx.Module):
    """A decoder-only GPT. ``GPT(cfg, rngs=nnx.Rngs(seed))`` or ``GPT(cfg, key=key)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, key: jax.Array | None = None):
        if key is None:
            key = (rngs or nnx.Rngs(0)).params()
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        k_wte, k_wpe, k_blocks, k_head = jax.random.split(key, 4)
        self.wte = init_param(k_wte, (cfg.vocab_size, cfg.n_embd), 0.02, pdt, ("vocab", "embed"))
        self.wpe = (
            init_param(k_wpe, (cfg.block_size, cfg.n_embd), 0.02, pdt, (None, "embed"))
            if cfg.position == "learned"
            else None
        )
        # One Block whose parameters carry a leading layer axis (vmap over the init).
        layer_keys = jax.random.split(k_blocks, cfg.n_layer)
        self.h = nnx.vmap(lambda k: Block(cfg, k), in_axes=0, out_axes=0)(layer_keys)
        for _, variable in nnx.iter_graph(self.h):
            if isinstance(variable, nnx.Param):
                variable.set_metadata("axes", ("layers", *variable.get_metadata()["axes"]))
        self.ln_f = LayerNorm(cfg)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else init_param(k_head, (cfg.vocab_size, cfg.n_embd), 0.02, pdt, ("vocab", "embed"))
        )

    # ----------------------------------------------------------------------------------
    # Full-sequence forward (training, evaluation)

    def __call__(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None, attention: bool = False):
        """Logits (B, T, V) in float32 for tokens (B, T). Dropout iff ``dropout_key``.

        With ``attention``: ``(logits, probs)``, probs (L, B, N, T, T) every layer's attention
        probabilities in float32 (row t: query t's distribution over the keys).
        """
        x, probs = self._forward(tokens, dropout_key, attention)
        return (self.logits(x), probs) if attention else self.logits(x)

    def hidden(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-LayerNorm hidden states (B, T, D) in the compute dtype."""
        return self._forward(tokens, dropout_key, attention=False)[0]

    def _forward(self, tokens, dropout_key, attention):
        cfg = self.config
        b, t = tokens.shape
        if t > cfg.block_size:
            raise GptjaxError(f"sequence length {t} exceeds the model's block_size ({cfg.block_size})")
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if dropout_key is not None:
            k_embd, k_layers = jax.random.split(dropout_key)
            layer_keys = jax.random.split(k_layers, cfg.n_layer)
        else:
            k_embd, layer_keys = None, None
        x = dropout(self.embed(tokens, positions), cfg.embd_dropout, k_embd)

        def layer(x, block, key):
            return block(x, positions, key, attention=attention)

        remat = remat_policy(cfg)
        if remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[remat])
        x, probs = self._over_layers(x, layer, layer_keys)
        return self.ln_f(x), probs

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        x = jnp.take(param_value(self.wte, dtype), tokens, axis=0)  # (B, T, D)
        if self.wpe is not None:
            x = x + jnp.take(param_value(self.wpe, dtype), positions, axis=0)
        return constrain(x, BTD)

    def logits(self, x: jax.Array) -> jax.Array:
        head = self.wte if self.lm_head is None else self.lm_head
        logits = jnp.einsum("BTD,VD->BTV", x, param_value(head, x.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", None, "vocab"))

    def _over_layers(self, x, layer, layer_keys):
        """Apply ``layer(x, block, key) -> (x, extra)`` for each stacked block, scanned or
        unrolled; returns x and the extras stacked over layers."""
        graphdef, stacked = nnx.split(self.h)

        def body(x, xs):
            state, key = xs
            return layer(x, nnx.merge(graphdef, state), key)

        if self.config.scan_layers:
            return jax.lax.scan(body, x, (stacked, layer_keys))
        extras = []
        for i in range(self.config.n_layer):
            x, extra = body(x, jax.tree.map(lambda a, i=i: a[i], (stacked, layer_keys)))
            extras.append(extra)
        return x, jax.tree.map(lambda *e: jnp.stack(e), *extras)

    # ----------------------------------------------------------------------------------
    # Cached decoding

    def init_cache(self, batch_size: int, max_len: int, start: jax.Array | None = None) -> KVCache:
        """An empty cache of ``max_len`` slots; ``start[b]`` is row b's left padding."""
        cfg = self.config
        if max_len > cfg.block_size:
            raise GptjaxError(f"cache length {max_len} exceeds the model's block_size ({cfg.block_size})")
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        start = jnp.zeros((batch_size,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        return KVCache(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), start=start, index=jnp.zeros((), jnp.int32)
        )

    def decode(
        self, tokens: jax.Array, cache: KVCache, layers: Sequence[nnx.State] | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Run tokens (B, T) at slots ``cache.index ...`` and return logits (B, T, V).

        Prefill is ``decode(prompts, empty_cache)``; each further call with T = 1 advances
        one token. Row b's position at slot j is ``j - cache.start[b]``; slots before
        ``start[b]`` are padding that no real query attends to.

        The blocks run in a ``lax.scan`` over the stacked parameters and a stacked cache,
        or, given ``layers`` and a per-layer cache (:mod:`gptjax.cpu_decode`), unrolled
        over those separate arrays. A scan slices
        each layer's weights and cache out of their stacks at every step, and XLA:CPU
        copies each slice: at batch 1 that copying is most of a token's time, so the CPU
        sampler unrolls.
        """
        b, t = tokens.shape
        per_layer = layers is not None
        if per_layer != isinstance(cache.k, tuple):
            raise GptjaxError("decode: pass layers= with a per-layer cache (gptjax.cpu_decode), or neither")
        s = (cache.k[0] if per_layer else cache.k).shape[-2]
        slots = cache.index + jnp.arange(t)  # (T,)
        positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)  # (B, T)
        key_slots = jnp.arange(s)
        causal = key_slots[None, :] <= slots[:, None]  # (T, S)
        real = key_slots[None, None, :] >= cache.start[:, None, None]  # (B, 1, S)
        # A padding query sees itself only, which keeps its softmax finite.
        mask = (causal[None] & real) | (key_slots[None, None, :] == slots[None, :, None])
        mask = mask[:, None]  # (B, 1, T, S)
        x = self.embed(tokens, positions)
        # Each layer writes only its new slots into the stacked caches, in place.
        graphdef, stacked = nnx.split(self.h)

        def body(carry, xs):
            x, k_all, v_all = carry
            state, layer = xs
            block = nnx.merge(graphdef, state)
            x, (k_all, v_all) = block(x, positions, None, (k_all, v_all, layer, cache.index, mask))
            return (x, k_all, v_all), None

        if per_layer:
            ks, vs = list(cache.k), list(cache.v)
            for i, state in enumerate(layers):
                block = nnx.merge(graphdef, state)
                x, (ks[i], vs[i]) = block(x, positions, None, (ks[i], vs[i], None, cache.index, mask))
            k_all, v_all = tuple(ks), tuple(vs)
        else:
            carry = (x, cache.k, cache.v)
            x, k_all, v_all = jax.lax.scan(body, carry, (stacked, jnp.arange(self.config.n_layer)))[0]
        logits = self.logits(self.ln_f(x))
        return logits, KVCache(k=k_all, v=v_all, start=cache.start, index=cache.index + t)


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and parameter shapes (ShapeDtypeStructs) of a GPT, allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: GPT(cfg, key=jax.random.key(0))))


def count_params(model: GPT) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
