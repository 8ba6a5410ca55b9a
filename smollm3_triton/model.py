"""The SmolLM3 / SmolLM2 transformer over a flattened batch on the paged KV cache.

    embed -> for each layer:  h += o_proj(attn(rope_qkv(rms_norm(h))))     RoPE or passthrough per layer
                              h += down(swiglu(gate_up(rms_norm(h))))
          -> rms_norm -> lm_head

A step's tokens from every sequence are one flat batch (`Batch`); only attention
looks across tokens, through each sequence's block table. Every step is one call
into `ops` (backends.Ops: Triton kernels or their torch references): each RMSNorm is
part of the op that consumes it and each residual add part of the matmul whose output
it adds, so on the Triton path a layer is five launches.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig, rope_tables
from .weights import ModelWeights

if TYPE_CHECKING:
    from .backends import Ops


@dataclass
class PagedKVCache:
    """K and V pools [n_layers, n_blocks, n_kv_heads, block_size, head_dim]: one
    allocation, so a layer's pool is a view (k[i])."""
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, config: ModelConfig, n_blocks: int, block_size: int, dtype: torch.dtype,
                 device) -> PagedKVCache:
        shape = (config.n_layers, n_blocks, config.n_kv_heads, block_size, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype.itemsize

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]


@dataclass
class Batch:
    """One forward step. Sequence b owns token rows query_start[b]:query_start[b+1];
    its context after the step is seq_lens[b] tokens, in the blocks of block_tables[b]."""
    token_ids: torch.Tensor      # [N] int64
    positions: torch.Tensor      # [N] int64
    slot_mapping: torch.Tensor   # [N] int64: block * block_size + offset, -1: not written
    query_start: torch.Tensor    # [B + 1] int32
    seq_lens: torch.Tensor       # [B] int32
    block_tables: torch.Tensor   # [B, max_blocks] int32
    max_query_len: int           # 1: a pure decode step
    logits_rows: torch.Tensor    # [R] int64: the rows whose logits are returned
    embeds: torch.Tensor | None = None       # [E, hidden]: rows replacing token embeddings (images)
    embed_rows: torch.Tensor | None = None   # [E] int64

    @classmethod
    def from_sequences(cls, seqs: list[torch.Tensor], blocks, block_size: int, device) -> Batch:
        """Each sequence computed from position 0 in consecutive blocks of `blocks`, with
        every row's logits: the batch of Runtime.logits and of tests."""
        blocks = list(blocks)
        lens = [len(s) for s in seqs]
        counts = [-(-n // block_size) for n in lens]
        tables = torch.zeros((len(seqs), max(counts)), dtype=torch.int32)
        slots, used = [], 0
        for b, (n, c) in enumerate(zip(lens, counts)):
            tables[b, :c] = torch.tensor(blocks[used:used + c], dtype=torch.int32)
            used += c
            slots += [blocks[used - c + p // block_size] * block_size + p % block_size for p in range(n)]
        starts = [0] + list(itertools.accumulate(lens))
        return cls(token_ids=torch.cat([torch.as_tensor(s) for s in seqs]).to(device),
                   positions=torch.cat([torch.arange(n) for n in lens]).to(device),
                   slot_mapping=torch.tensor(slots).to(device),
                   query_start=torch.tensor(starts, dtype=torch.int32).to(device),
                   seq_lens=torch.tensor(lens, dtype=torch.int32).to(device), block_tables=tables.to(device),
                   max_query_len=max(lens), logits_rows=torch.arange(starts[-1]).to(device))


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, ops: Ops, *,
                 max_seq_len: int, dtype: torch.dtype, device: torch.device, kv_dtype: torch.dtype | None = None):
        self.config, self.weights, self.ops = config, weights, ops
        self.dtype, self.device = dtype, device
        self.kv_dtype = kv_dtype or dtype        # the KV cache's storage (the cpu backend: float16)
        self.max_seq_len = max_seq_len           # the longest sequence; RoPE tables cover it
        self.cos, self.sin = rope_tables(config, max_seq_len, device)
        self.scale = config.head_dim ** -0.5
        self.cache: PagedKVCache | None = None

    def allocate_cache(self, n_blocks: int, block_size: int) -> PagedKVCache:
        self.cache = PagedKVCache.allocate(self.config, n_blocks, block_size, self.kv_dtype, self.device)
        return self.cache

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits [len(batch.logits_rows), vocab] float32; the tokens' K/V go into the cache.
        h is the residual stream; `stats` what its next RMSNorm needs beyond h (backends.Ops)."""
        c, w, ops, cache = self.config, self.weights, self.ops, self.cache
        N = batch.token_ids.shape[0]
        eps = c.rms_norm_eps
        h, stats = ops.embed(batch.token_ids, w.embed, self.dtype, eps)
        if batch.embeds is not None:
            h[batch.embed_rows] = batch.embeds.to(self.dtype)
            stats = ops.row_stats(h, eps)
        for i, layer in enumerate(w.layers):
            q = ops.norm_rope_qkv(h, stats, layer.attn_norm, eps, layer.qkv, batch.positions, self.cos, self.sin,
                                  cache.k[i], cache.v[i], batch.slot_mapping, c.n_heads, c.n_kv_heads, c.head_dim,
                                  c.use_rope[i])
            attn = ops.attention(q, cache.k[i], cache.v[i], batch.query_start, batch.seq_lens,
                                 batch.block_tables, batch.max_query_len, self.scale)
            h, stats = ops.add_matmul(attn.reshape(N, c.n_heads * c.head_dim), layer.o, h, eps)
            act = ops.norm_gate_up_swiglu(h, stats, layer.ffn_norm, eps, layer.gate_up)
            h, stats = ops.add_matmul(act, layer.down, h, eps)
        rows = batch.logits_rows
        return ops.norm_logits(h[rows], None if stats is None else stats[rows], w.norm, eps, w.lm_head)
