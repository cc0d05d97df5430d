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

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.sharding import constrain, constrain_param, current_platform
from gptjax.splash import splash_attention

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


def _param(key: jax.Array, shape: tuple[int, ...], std: float, dtype, axes: tuple) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(key, shape, dtype), axes=axes)


def _zeros(shape: tuple[int, ...], dtype, axes: tuple) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


def _matmul(x: jax.Array, kernel: nnx.Variable, n_in: int) -> jax.Array:
    """x (..., *inputs) times kernel (*inputs, *outputs): (..., *outputs).

    The contracted axes are flattened into one (XLA:CPU otherwise copies a kernel with two
    contracted axes into a matmul layout at every call); the output axes stay, so a kernel
    sharded over heads keeps its sharding. A kernel marked ``rows_first``
    (:func:`gptjax.cpu_decode.layer_states`) is stored (*outputs, *inputs) and contracted over
    its minor axis.
    """
    w = _value(kernel, x.dtype)
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
    x = x.reshape(*lead, k)
    if kernel.get_metadata().get("rows_first"):
        # As one (outputs, inputs) matrix: one dot_general over the unflattened kernel
        # made the CPU decode step 2x slower.
        y = jnp.einsum("...K,OK->...O", x, w.reshape(-1, k))
        return y.reshape(*lead, *w.shape[: w.ndim - n_in])
    return jax.lax.dot_general(x, w.reshape(k, *w.shape[n_in:]), (((x.ndim - 1,), (0,)), ((), ())))


def _value(param: nnx.Variable, dtype) -> jax.Array:
    """A parameter's value in ``dtype``, pinned to its own sharding under a mesh.

    Pinned after the cast, so the gradient is reduce-scattered in the compute dtype (a cast
    between XLA's all-reduce and its slice hides the reduce-scatter); see :mod:`gptjax.sharding`.
    """
    return constrain_param(param[...].astype(dtype), param.get_metadata()["axes"])


# Logical names of activations (ACTIVATION_RULES in gptjax.sharding maps them to mesh axes).
BTD = ("batch", None, "embed")
BTNH = ("batch", None, "heads", None)


def _heads_first(x: jax.Array) -> jax.Array:
    """(B, T, N, H) <-> (B, N, T, H)."""
    return x.transpose(0, 2, 1, 3)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        pdt = jnp.dtype(cfg.param_dtype)
        self.eps = cfg.layer_norm_epsilon
        self.scale = nnx.Param(jnp.ones((cfg.n_embd,), pdt), axes=("embed",))
        self.bias = _zeros((cfg.n_embd,), pdt, ("embed",)) if cfg.bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype.
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * _value(self.scale, jnp.float32)
        if self.bias is not None:
            y = y + _value(self.bias, jnp.float32)
        return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding (GPT-NeoX half-split layout) of x (B, T, N, H) at positions (B, T)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, H/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


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


def attention_implementation(cfg: ModelConfig) -> str:
    """``xla``, ``cudnn`` or ``splash``: what ``cfg.attention`` resolves to on the current backend.

    ``auto`` is ``splash`` when tracing for a TPU (the mesh's platform, so a TPU compile on a
    CPU host counts), cuDNN on a GPU with a 16-bit dtype, else XLA.
    """
    if cfg.attention != "auto":
        return cfg.attention
    platform = current_platform()
    if platform == "tpu":
        return "splash"
    return "cudnn" if platform == "gpu" and cfg.dtype in ("bfloat16", "float16") else "xla"


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, key: jax.Array):
        d, n, h = cfg.n_embd, cfg.n_head, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        k_attn, k_proj = jax.random.split(key)
        self.cfg = cfg
        # Fused QKV; (D, 3, N, H) is HF GPT-2's (D, 3D) c_attn kernel, reshaped.
        self.c_attn = _param(k_attn, (d, 3, n, h), 0.02, pdt, ("embed", None, "heads", "head_dim"))
        self.c_attn_bias = _zeros((3, n, h), pdt, (None, "heads", "head_dim")) if cfg.bias else None
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual init
        self.c_proj = _param(k_proj, (n, h, d), std_proj, pdt, ("heads", "head_dim", "embed"))
        self.c_proj_bias = _zeros((d,), pdt, ("embed",)) if cfg.bias else None

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        qkv = _matmul(x, self.c_attn, 1)  # (B, T, 3, N, H)
        if self.c_attn_bias is not None:
            qkv = qkv + _value(self.c_attn_bias, x.dtype)
        qkv = constrain(qkv, ("batch", None, None, "heads", None))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, H)
        if self.cfg.position == "rope":
            q, k = rope(q, positions), rope(k, positions)
        return q, k, v

    def project(self, y: jax.Array) -> jax.Array:
        out = _matmul(constrain(y, BTNH), self.c_proj, 2)
        if self.c_proj_bias is not None:
            out = out + _value(self.c_proj_bias, y.dtype)
        return constrain(out, BTD)

    def __call__(self, x: jax.Array, positions: jax.Array, dropout_key: jax.Array | None, cache=None):
        """Causal self-attention.

        Without a cache: full causal attention over x (B, T, D). With ``cache = (k_all,
        v_all, layer, index, mask)``: write this step's keys/values into the stacked
        (L, B, N, S, H) caches at ``[layer, :, :, index]`` in place (or, with ``layer``
        None, into this layer's own (B*N, S, H) caches), attend over that layer's slots
        under ``mask`` (B, 1, T, S), and return the updated caches.
        """
        q, k, v = self.qkv(x, positions)
        if cache is None:
            return self.project(self._causal(q, k, v, dropout_key)), None
        k_all, v_all, layer, index, mask = cache
        k, v = _heads_first(k).astype(k_all.dtype), _heads_first(v).astype(v_all.dtype)
        if layer is None:  # this layer's own (B*N, S, H) caches
            b, n, t, h = k.shape
            k_all = jax.lax.dynamic_update_slice(k_all, k.reshape(b * n, t, h), (0, index, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v.reshape(b * n, t, h), (0, index, 0))
            k_layer, v_layer = k_all, v_all
        else:
            k_all = jax.lax.dynamic_update_slice(k_all, k[None], (layer, 0, 0, index, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None], (layer, 0, 0, index, 0))
            k_layer, v_layer = k_all[layer], v_all[layer]
        y = self._attend(q, k_layer, v_layer, mask=mask, dropout_key=None)
        return self.project(y), (k_all, v_all)

    def _causal(self, q, k, v, dropout_key):
        cfg = self.cfg
        if attention_implementation(cfg) == "cudnn" and (dropout_key is None or cfg.attn_dropout == 0):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        # auto picks splash only for whole 128-token tiles (the TPU kernel's smallest block).
        tiles = q.shape[1] % 128 == 0
        splash = attention_implementation(cfg) == "splash" and (cfg.attention == "splash" or tiles)
        if splash and (dropout_key is None or cfg.attn_dropout == 0):
            scale = jnp.asarray(1 / math.sqrt(cfg.head_dim), q.dtype)
            return _heads_first(splash_attention(*(_heads_first(x) for x in (q * scale, k, v))))
        t = q.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        return self._attend(q, _heads_first(k), _heads_first(v), mask=causal, dropout_key=dropout_key)

    def _attend(self, q, k, v, *, mask, dropout_key):
        """Softmax attention of q (B, T, N, H) over k, v where mask (.., T, S) is True.

        k and v are (B, N, S, H), or (B*N, S, H) for a per-layer decode cache.

        The plain formulation: dropout on probabilities needs them materialised, and on CPU
        it beats jax.nn.dot_product_attention's XLA path (fwd + bwd). Keys and values are
        heads-first (the KV cache is stored that way), so every batched matmul has its batch
        dimensions leading: 16% off the quick-start train step on CPU against contracting in
        (B, T, N, H), and no per-token transpose of the whole cache when decoding. q is
        scaled (T*H), not the scores (T*S).
        """
        q = _heads_first(q * jnp.asarray(1 / math.sqrt(self.cfg.head_dim), q.dtype))
        b, n, t, h = q.shape
        batch = k.shape[:-2]  # (B, N) or (B*N,)
        q = q.reshape(*batch, t, h)
        scores = jnp.einsum("...TH,...SH->...TS", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores.reshape(b, n, t, -1), jnp.finfo(jnp.float32).min)
        probs = _dropout(jax.nn.softmax(scores, -1), self.cfg.attn_dropout, dropout_key).astype(v.dtype)
        out = jnp.einsum("...TS,...SH->...TH", probs.reshape(*batch, t, -1), v)
        return _heads_first(out.reshape(b, n, t, h))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, key: jax.Array):
        d, f = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
        pdt = jnp.dtype(cfg.param_dtype)
        k_fc, k_proj = jax.random.split(key)
        self.approximate = cfg.activation == "gelu_tanh"
        self.c_fc = _param(k_fc, (d, f), 0.02, pdt, ("embed", "mlp"))
        self.c_fc_bias = _zeros((f,), pdt, ("mlp",)) if cfg.bias else None
        self.c_proj = _param(k_proj, (f, d), 0.02 / math.sqrt(2 * cfg.n_layer), pdt, ("mlp", "embed"))
        self.c_proj_bias = _zeros((d,), pdt, ("embed",)) if cfg.bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _matmul(x, self.c_fc, 1)
        if self.c_fc_bias is not None:
            h = h + _value(self.c_fc_bias, x.dtype)
        h = constrain(jax.nn.gelu(h, approximate=self.approximate), ("batch", None, "mlp"))
        out = _matmul(h, self.c_proj, 1)
        if self.c_proj_bias is not None:
            out = out + _value(self.c_proj_bias, x.dtype)
        return constrain(out, BTD)


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        k_attn, k_mlp = jax.random.split(key)
        self.resid_dropout = cfg.resid_dropout
        self.ln_1 = LayerNorm(cfg)
        self.attn = Attention(cfg, k_attn)
        self.ln_2 = LayerNorm(cfg)
        self.mlp = MLP(cfg, k_mlp)

    def __call__(self, x, positions, dropout_key, cache=None):
        k_attn, k_res1, k_res2 = jax.random.split(dropout_key, 3) if dropout_key is not None else (None,) * 3
        x = constrain(x, BTD)
        y, new_cache = self.attn(self.ln_1(x), positions, k_attn, cache)
        x = constrain(x + _dropout(y, self.resid_dropout, k_res1), BTD)
        x = x + _dropout(self.mlp(self.ln_2(x)), self.resid_dropout, k_res2)
        return constrain(x, BTD), new_cache


class GPT(nnx.Module):
    """A decoder-only GPT. ``GPT(cfg, rngs=nnx.Rngs(seed))`` or ``GPT(cfg, key=key)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, key: jax.Array | None = None):
        if key is None:
            key = (rngs or nnx.Rngs(0)).params()
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        k_wte, k_wpe, k_blocks, k_head = jax.random.split(key, 4)
        self.wte = _param(k_wte, (cfg.vocab_size, cfg.n_embd), 0.02, pdt, ("vocab", "embed"))
        self.wpe = (
            _param(k_wpe, (cfg.block_size, cfg.n_embd), 0.02, pdt, (None, "embed"))
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
            else _param(k_head, (cfg.vocab_size, cfg.n_embd), 0.02, pdt, ("vocab", "embed"))
        )

    # ----------------------------------------------------------------------------------
    # Full-sequence forward (training, evaluation)

    def __call__(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (B, T, V) in float32 for tokens (B, T). Dropout iff ``dropout_key``."""
        return self.logits(self.hidden(tokens, dropout_key=dropout_key))

    def hidden(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-LayerNorm hidden states (B, T, D) in the compute dtype."""
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
        x = _dropout(self.embed(tokens, positions), cfg.embd_dropout, k_embd)

        def layer(x, block, key):
            return block(x, positions, key)[0]

        remat = remat_policy(cfg)
        if remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[remat])
        x = self._over_layers(x, layer, layer_keys)
        return self.ln_f(x)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        x = jnp.take(_value(self.wte, dtype), tokens, axis=0)  # (B, T, D)
        if self.wpe is not None:
            x = x + jnp.take(_value(self.wpe, dtype), positions, axis=0)
        return constrain(x, BTD)

    def logits(self, x: jax.Array) -> jax.Array:
        head = self.wte if self.lm_head is None else self.lm_head
        logits = jnp.einsum("BTD,VD->BTV", x, _value(head, x.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", None, "vocab"))

    def _over_layers(self, x, layer, layer_keys):
        """Apply ``layer(x, block, key)`` for each stacked block, scanned or unrolled."""
        graphdef, stacked = nnx.split(self.h)

        def body(x, xs):
            state, key = xs
            return layer(x, nnx.merge(graphdef, state), key), None

        if self.config.scan_layers:
            return jax.lax.scan(body, x, (stacked, layer_keys))[0]
        for i in range(self.config.n_layer):
            xs = jax.tree.map(lambda a, i=i: a[i], (stacked, layer_keys))
            x = body(x, xs)[0]
        return x

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
