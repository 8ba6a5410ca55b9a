"""Fused QKV projection, RoPE (or passthrough on NoPE layers), and the KV-cache write.

Layout: the fused weight stacks Q rows ([n_heads * head_dim]), then K, then V
([n_kv_heads * head_dim] each), all in the half-split ("rotate_half") RoPE
layout of Hugging Face checkpoints; GGUF's interleaved rows are reordered at load.

RoPE at position p rotates each pair (x[i], x[i + d/2]) by angle p * inv_freq[i]:
    x'[i]       = x[i] cos - x[i + d/2] sin
    x'[i + d/2] = x[i + d/2] cos + x[i] sin
cos/sin come from a table [max_seq, d/2] built in float64 at load (positions reach
128k and rope_theta is 5e6, so fp32 angles would drift).

The caches are [n_kv_heads, max_seq, head_dim]; k and v of token t go to row
positions[t]. Returns q [T, n_heads, head_dim].
"""
from __future__ import annotations

import torch

from smollm3_triton.quant import Weight

from .qmatmul import qmatmul_torch


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, D/2] (already gathered at the positions)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_qkv_torch(x: torch.Tensor, w_qkv: Weight, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool) -> torch.Tensor:
    T = x.shape[0]
    qkv = qmatmul_torch(x, w_qkv)
    q_end, k_end = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    q = qkv[:, :q_end].view(T, n_heads, head_dim)
    k = qkv[:, q_end:k_end].view(T, n_kv_heads, head_dim)
    v = qkv[:, k_end:].view(T, n_kv_heads, head_dim)
    if use_rope:
        c, s = cos[positions], sin[positions]
        q, k = apply_rope_torch(q, c, s), apply_rope_torch(k, c, s)
    k_cache[:, positions] = k.transpose(0, 1).to(k_cache.dtype)
    v_cache[:, positions] = v.transpose(0, 1).to(v_cache.dtype)
    return q
