"""A small PyTorch GPT-2 with gptjax's architecture: the reference the train benchmark runs.

Pre-LN blocks (``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``), a fused QKV ``Linear``,
GELU (tanh approximation), learned positions, a final LayerNorm and an LM head tied to
the token embedding. Attention is ``F.scaled_dot_product_attention(is_causal=True)``.

The training step matches gptjax's: mean next-token cross-entropy, gradients clipped to
global norm ``grad_clip``, then AdamW with weight decay on the weight matrices only
(not embeddings, biases or LayerNorms). :func:`load_hf_state_dict` copies gptjax's
weights (``gptjax.interop.hf_state_dict``) into the model so that both compute the same
function on the same weights; the benchmark checks their step-0 losses agree before it times anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """One pre-LN transformer block."""

    def __init__(self, n_embd: int, n_head: int, n_layer: int, eps: float):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)
        residual_std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2's scaled residual init
        for linear, std in (
            (self.c_attn, 0.02),
            (self.attn_proj, residual_std),
            (self.c_fc, 0.02),
            (self.mlp_proj, residual_std),
        ):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.c_attn(self.ln_1(x))  # (B, T, 3D)
        # (B, T, 3, N, H) -> three (B, N, T, H)
        q, k, v = qkv.view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, N, T, H)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, blocks, final LayerNorm, tied head."""

    def __init__(
        self, *, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, eps: float = 1e-5
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        self.h = nn.ModuleList(Block(n_embd, n_head, n_layer, eps) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)

    @classmethod
    def from_config(cls, cfg) -> GPT:
        """Build from a :class:`gptjax.config.ModelConfig` (GPT-2 options only)."""
        supported = cfg.bias and cfg.tie_embeddings and cfg.position == "learned" and cfg.mlp_ratio == 4
        if not supported or cfg.activation != "gelu_tanh":
            raise ValueError("the torch reference implements GPT-2 only (bias, tied, learned, gelu_tanh)")
        return cls(
            vocab_size=cfg.vocab_size,
            block_size=cfg.block_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            eps=cfg.layer_norm_epsilon,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T)."""
        t = tokens.shape[1]
        x = self.wte(tokens) + self.wpe(torch.arange(t, device=tokens.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def make_optimizer(
    model: GPT, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW that decays the Linear weights (gptjax's ``_MATRICES``) and nothing else."""
    decay = [
        p
        for name, p in model.named_parameters()
        if name.endswith("weight") and p.dim() == 2 and not name.startswith(("wte", "wpe"))
    ]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # foreach: the multi-tensor path, torch's default on CPU when it is available.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, batch: torch.Tensor, grad_clip: float) -> float:
    """One update on batch (B, T+1); returns the loss before the update."""
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def load_hf_state_dict(model: GPT, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy HF GPT-2 tensors (``gptjax.interop.hf_state_dict``) into ``model``.

    HF's ``Conv1D`` kernels are (in, out); torch's ``Linear`` stores (out, in), so they
    are transposed.
    """

    def get(name: str, transpose: bool = False) -> torch.Tensor:
        value = torch.from_numpy(np.array(tensors[name], dtype=np.float32))
        return value.T if transpose else value

    model.wte.weight.copy_(get("transformer.wte.weight"))
    model.wpe.weight.copy_(get("transformer.wpe.weight")[: model.wpe.weight.shape[0]])
    model.ln_f.weight.copy_(get("transformer.ln_f.weight"))
    model.ln_f.bias.copy_(get("transformer.ln_f.bias"))
    for i, block in enumerate(model.h):
        p = f"transformer.h.{i}."
        pairs = {
            block.ln_1.weight: get(p + "ln_1.weight"),
            block.ln_1.bias: get(p + "ln_1.bias"),
            block.ln_2.weight: get(p + "ln_2.weight"),
            block.ln_2.bias: get(p + "ln_2.bias"),
            block.c_attn.weight: get(p + "attn.c_attn.weight", transpose=True),
            block.c_attn.bias: get(p + "attn.c_attn.bias"),
            block.attn_proj.weight: get(p + "attn.c_proj.weight", transpose=True),
            block.attn_proj.bias: get(p + "attn.c_proj.bias"),
            block.c_fc.weight: get(p + "mlp.c_fc.weight", transpose=True),
            block.c_fc.bias: get(p + "mlp.c_fc.bias"),
            block.mlp_proj.weight: get(p + "mlp.c_proj.weight", transpose=True),
            block.mlp_proj.bias: get(p + "mlp.c_proj.bias"),
        }
        for target, source in pairs.items():
            target.copy_(source)
