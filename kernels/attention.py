"""Causal grouped-query attention of new queries over the KV cache.

Query t sits at absolute position positions[t] and sees cache rows 0..positions[t].
Query head h reads KV head h // (n_heads // n_kv_heads). Softmax in fp32.
"""
from __future__ import annotations

import torch


def attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D]; caches [Hkv, S, D]; positions [T] -> out [T, H, D] in q's dtype."""
    T, H, D = q.shape
    n_kv = k_cache.shape[0]
    kv_len = int(positions.max()) + 1
    k = k_cache[:, :kv_len].float().repeat_interleave(H // n_kv, dim=0)   # [H, L, D]
    v = v_cache[:, :kv_len].float().repeat_interleave(H // n_kv, dim=0)
    scores = torch.einsum("thd,hld->htl", q.float(), k) * scale             # [H, T, L]
    visible = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    out = torch.einsum("htl,hld->thd", scores.softmax(-1), v)
    return out.to(q.dtype)
