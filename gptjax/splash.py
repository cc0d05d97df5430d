"""Splash attention: the Pallas TPU kernel for causal attention, per shard of batch and heads."""

from __future__ import annotations

import jax

from gptjax.errors import GptjaxError
from gptjax.sharding import current_platform, map_shards


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention of q, k, v (B, N, T, H) (q already scaled) with the Pallas splash kernel.

    The TPU kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) computes the
    softmax in blocks and never materialises the (T, T) scores; off a TPU it runs in Pallas
    interpret mode (slow: for tests). Under a mesh it runs per shard of batch and heads.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    interpret = current_platform() != "tpu"

    def per_shard(q, k, v):  # (B, N, T, H) of this device
        n, t = q.shape[1], q.shape[2]
        block = min(512, t)
        if t % block:
            raise GptjaxError(f"splash attention needs the sequence length ({t}) to be a multiple of {block}")
        sizes = splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
        )  # fmt: skip
        mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(n)])
        kernel = splash.make_splash_mha(
            mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
        )
        return jax.vmap(kernel)(q, k, v)

    return map_shards(per_shard, ("batch", "heads", None, None), q, k, v)
