"""The layers of the GPT: LayerNorm, rotary positions, causal attention, MLP and the block.

Shapes as in :mod:`gptjax.model`: B batch, T time, S cache slots, D model width, N heads,
H head dim, F MLP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.sharding import constrain, constrain_param, current_platform
from gptjax.splash import splash_attention


def init_param(key: jax.Array, shape: tuple[int, ...], std: float, dtype, axes: tuple) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(key, shape, dtype), axes=axes)


def zeros_param(shape: tuple[int, ...], dtype, axes: tuple) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


def matmul(x: jax.Array, kernel: nnx.Variable, n_in: int) -> jax.Array:
    """x (..., *inputs) times kernel (*inputs, *outputs): (..., *outputs).

    The contracted axes are flattened into one (XLA:CPU otherwise copies a kernel with two
    contracted axes into a matmul layout at every call); the output axes stay, so a kernel
    sharded over heads keeps its sharding. A kernel marked ``rows_first``
    (:func:`gptjax.cpu_decode.layer_states`) is stored (*outputs, *inputs) and contracted over
    its minor axis.
    """
    w = param_value(kernel, x.dtype)
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
    x = x.reshape(*lead, k)
    if kernel.get_metadata().get("rows_first"):
        # As one (outputs, inputs) matrix: one dot_general over the unflattened kernel
        # made the CPU decode step 2x slower.
        y = jnp.einsum("...K,OK->...O", x, w.reshape(-1, k))
        return y.reshape(*lead, *w.shape[: w.ndim - n_in])
    return jax.lax.dot_general(x, w.reshape(k, *w.shape[n_in:]), (((x.ndim - 1,), (0,)), ((), ())))


def param_value(param: nnx.Variable, dtype) -> jax.Array:
    """A parameter's value in ``dtype``, pinned to its own sharding under a mesh.

    Pinned after the cast, so the gradient is reduce-scattered in the compute dtype (a cast
    between XLA's all-reduce and its slice hides the reduce-scatter); see :mod:`gptjax.sharding`.
    """
    return constrain_param(param[...].astype(dtype), param.get_metadata()["axes"])


# Logical names of activations (ACTIVATION_RULES in gptjax.sharding maps them to mesh axes).
BTD = ("batch", None, "embed")
BTNH = ("batch", None, "heads", None)


def heads_first(x: jax.Array) -> jax.Array:
    """(B, T, N, H) <-> (B, N, T, H)."""
    return x.transpose(0, 2, 1, 3)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        pdt = jnp.dtype(cfg.param_dtype)
        self.eps = cfg.layer_norm_epsilon
        self.scale = nnx.Param(jnp.ones((cfg.n_embd,), pdt), axes=("embed",))
        self.bias = zeros_param((cfg.n_embd,), pdt, ("embed",)) if cfg.bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype.
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * param_value(self.scale, jnp.float32)
        if self.bias is not None:
            y = y + param_value(self.bias, jnp.float32)
        return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding (GPT-NeoX half-split layout) of x (B, T, N, H) at positions (B, T)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, H/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


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
        self.c_attn = init_param(k_attn, (d, 3, n, h), 0.02, pdt, ("embed", None, "heads", "head_dim"))
        self.c_attn_bias = zeros_param((3, n, h), pdt, (None, "heads", "head_dim")) if cfg.bias else None
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual init
        self.c_proj = init_param(k_proj, (n, h, d), std_proj, pdt, ("heads", "head_dim", "embed"))
        self.c_proj_bias = zeros_param((d,), pdt, ("embed",)) if cfg.bias else None

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        qkv = matmul(x, self.c_attn, 1)  # (B, T, 3, N, H)
        if self.c_attn_bias is not None:
            qkv = qkv + param_value(self.c_attn_bias, x.dtype)
        qkv = constrain(qkv, ("batch", None, None, "heads", None))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, H)
        if self.cfg.position == "rope":
            q, k = rope(q, positions), rope(k, positions)
        return q, k, v

    def project(self, y: jax.Array) -> jax.Array:
        out = matmul(constrain(y, BTNH), self.c_proj, 2)
        if self.c_proj_bias is not None:
            out = out + param_value(self.c_proj_bias, y.dtype)
        return constrain(out, BTD)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        dropout_key: jax.Array | None,
        cache=None,
        *,
        attention: bool = False,
    ):
        """Causal self-attention: ``(out, extra)``.

        Without a cache: full causal attention over x (B, T, D); ``extra`` is None, or with
        ``attention`` the probabilities (B, N, T, T) in float32 (the plain path, never a
        fused kernel, since those do not materialise them). With ``cache = (k_all,
        v_all, layer, index, mask)``: write this step's keys/values into the stacked
        (L, B, N, S, H) caches at ``[layer, :, :, index]`` in place (or, with ``layer``
        None, into this layer's own (B*N, S, H) caches), attend over that layer's slots
        under ``mask`` (B, 1, T, S), and return the updated caches.
        """
        q, k, v = self.qkv(x, positions)
        if attention:
            t = q.shape[1]
            causal = jnp.tril(jnp.ones((t, t), bool))
            y, probs = self._attend(q, heads_first(k), heads_first(v), mask=causal, dropout_key=dropout_key)
            return self.project(y), probs
        if cache is None:
            return self.project(self._causal(q, k, v, dropout_key)), None
        k_all, v_all, layer, index, mask = cache
        k, v = heads_first(k).astype(k_all.dtype), heads_first(v).astype(v_all.dtype)
        if layer is None:  # this layer's own (B*N, S, H) caches
            b, n, t, h = k.shape
            k_all = jax.lax.dynamic_update_slice(k_all, k.reshape(b * n, t, h), (0, index, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v.reshape(b * n, t, h), (0, index, 0))
            k_layer, v_layer = k_all, v_all
        else:
            k_all = jax.lax.dynamic_update_slice(k_all, k[None], (layer, 0, 0, index, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None], (layer, 0, 0, index, 0))
            k_layer, v_layer = k_all[layer], v_all[layer]
        y, _ = self._attend(q, k_layer, v_layer, mask=mask, dropout_key=None)
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
            return heads_first(splash_attention(*(heads_first(x) for x in (q * scale, k, v))))
        t = q.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        return self._attend(q, heads_first(k), heads_first(v), mask=causal, dropout_key=dropout_key)[0]

    def _attend(self, q, k, v, *, mask, dropout_key):
        """Softmax attention of q (B, T, N, H) over k, v where mask (.., T, S) is True, and
        its probabilities (B, N, T, S) in float32 (before dropout).

        k and v are (B, N, S, H), or (B*N, S, H) for a per-layer decode cache.

        The plain formulation: dropout on probabilities needs them materialised, and on CPU
        it beats jax.nn.dot_product_attention's XLA path (fwd + bwd). Keys and values are
        heads-first (the KV cache is stored that way), so every batched matmul has its batch
        dimensions leading: 16% off the quick-start train step on CPU against contracting in
        (B, T, N, H), and no per-token transpose of the whole cache when decoding. q is
        scaled (T*H), not the scores (T*S).
        """
        q = heads_first(q * jnp.asarray(1 / math.sqrt(self.cfg.head_dim), q.dtype))
        b, n, t, h = q.shape
        batch = k.shape[:-2]  # (B, N) or (B*N,)
        q = q.reshape(*batch, t, h)
        scores = jnp.einsum("...TH,...SH->...TS", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores.reshape(b, n, t, -1), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, -1)
        dropped = dropout(probs, self.cfg.attn_dropout, dropout_key).astype(v.dtype)
        out = jnp.einsum("...TS,...SH->...TH", dropped.reshape(*batch, t, -1), v)
        return heads_first(out.reshape(b, n, t, h)), probs


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, key: jax.Array):
        d, f = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
        pdt = jnp.dtype(cfg.param_dtype)
        k_fc, k_proj = jax.random.split(key)
        self.approximate = cfg.activation == "gelu_tanh"
        self.c_fc = init_param(k_fc, (d, f), 0.02, pdt, ("embed", "mlp"))
        self.c_fc_bias = zeros_param((f,), pdt, ("mlp",)) if cfg.bias else None
        self.c_proj = init_param(k_proj, (f, d), 0.02 / math.sqrt(2 * cfg.n_layer), pdt, ("mlp", "embed"))
        self.c_proj_bias = zeros_param((d,), pdt, ("embed",)) if cfg.bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = matmul(x, self.c_fc, 1)
        if self.c_fc_bias is not None:
            h = h + param_value(self.c_fc_bias, x.dtype)
        h = constrain(jax.nn.gelu(h, approximate=self.approximate), ("batch", None, "mlp"))
        out = matmul(h, self.c_proj, 1)
        if self.c_proj_bias is not None:
            out = out + param_value(self.c_proj_bias, x.dtype)
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

    def __call__(self, x, positions, dropout_key, cache=None, *, attention=False):
        """``(x, extra)``: ``extra`` as :meth:`Attention.__call__` returns it."""
        k_attn, k_res1, k_res2 = jax.random.split(dropout_key, 3) if dropout_key is not None else (None,) * 3
        x = constrain(x, BTD)
        y, extra = self.attn(self.ln_1(x), positions, k_attn, cache, attention=attention)
        x = constrain(x + dropout(y, self.resid_dropout, k_res1), BTD)
        x = x + dropout(self.mlp(self.ln_2(x)), self.resid_dropout, k_res2)
        return constrain(x, BTD), extra
