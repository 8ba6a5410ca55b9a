"""The SmolLM3 / SmolLM2 transformer on a static KV cache.

    embed -> for each layer:  x += o_proj(attn(rope_qkv(rms_norm(x))))     RoPE or passthrough per layer
                              x += down(swiglu(gate_up(rms_norm(x))))
          -> rms_norm -> lm_head

Every step is one call into `ops` (Triton kernels or their torch references).
The residual add is folded into the next rms_norm: x is the branch output and
`residual` the running stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig, rope_tables
from .kernels import Ops
from .weights import ModelWeights


@dataclass
class KVCache:
    """Static per-layer caches [n_layers, n_kv_heads, max_seq_len, head_dim]."""
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, config: ModelConfig, max_seq_len: int, dtype: torch.dtype, device) -> KVCache:
        shape = (config.n_layers, config.n_kv_heads, max_seq_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, ops: Ops, *,
                 max_seq_len: int, dtype: torch.dtype, device: torch.device):
        self.config, self.weights, self.ops = config, weights, ops
        self.dtype, self.device = dtype, device
        self.cos, self.sin = rope_tables(config, max_seq_len, device)
        self.cache = KVCache.allocate(config, max_seq_len, dtype, device)
        self.scale = config.head_dim ** -0.5

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """tokens, positions [T] on the model's device -> logits [T or 1, vocab] float32.

        Writes the tokens' K/V into the cache at `positions`; earlier positions
        must already be there.
        """
        c, w, ops = self.config, self.weights, self.ops
        T = tokens.shape[0]
        x = w.embed.dequantize_rows(tokens, self.dtype)
        residual = None
        for i, layer in enumerate(w.layers):
            h, residual = ops.rms_norm(x, layer.attn_norm, c.rms_norm_eps, residual)
            q = ops.rope_qkv(h, layer.qkv, positions, self.cos, self.sin, self.cache.k[i], self.cache.v[i],
                             c.n_heads, c.n_kv_heads, c.head_dim, c.use_rope[i])
            attn = ops.attention(q, self.cache.k[i], self.cache.v[i], positions, self.scale)
            x = ops.qmatmul(attn.reshape(T, c.n_heads * c.head_dim), layer.o)
            h, residual = ops.rms_norm(x, layer.ffn_norm, c.rms_norm_eps, residual)
            x = ops.qmatmul(ops.gate_up_swiglu(h, layer.gate_up), layer.down)
        if last_only:
            x, residual = x[-1:], residual[-1:]
        h, _ = ops.rms_norm(x, w.norm, c.rms_norm_eps, residual)
        return ops.qmatmul(h, w.lm_head).float()
