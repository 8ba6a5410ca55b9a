"""Paged-attention test cases: a query batch, a noisy KV pool and random block tables
for a list of (query count, context length) sequences."""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (n_heads, n_kv_heads, head_dim): SmolLM3-3B, SmolLM2-135M, SmolLM2-360M, plain MHA.
HEADS = [(16, 4, 128), (9, 3, 64), (15, 5, 64), (8, 8, 128)]
HEAD_IDS = [f"{h}-{kv}-d{d}" for h, kv, d in HEADS]
# A mixed step: (query count, context length after the step) per sequence: a prefill
# chunk after a cached prefix, decodes of different lengths, a fresh prompt, an idle
# padding row (length 0: zeros) and a decode at length 1.
MIXED = [(21, 70), (1, 37), (1, 130), (9, 9), (1, 0), (1, 1)]


class Case:
    """q, a paged pool and the batch tensors for `seqs` = [(q_len, seq_len), ...]."""

    def __init__(self, heads, seqs, dtype, block_size=16, seed=0, q_scale=1.0, width=None, spare_blocks=3):
        n_heads, n_kv, head_dim = heads
        g = torch.Generator().manual_seed(seed)
        need = [-(-L // block_size) for _, L in seqs]
        n_blocks = sum(need) + spare_blocks
        width = width or max(max(need), 1) + 1
        perm = torch.randperm(n_blocks, generator=g)
        tables = torch.zeros(len(seqs), width, dtype=torch.int32)
        used = 0
        for b, n in enumerate(need):
            tables[b, :n] = perm[used:used + n].int()
            used += n
        N = sum(q for q, _ in seqs)
        self.q = (torch.randn(N, n_heads, head_dim, generator=g) * q_scale).to(dtype).to(DEVICE)
        self.k = torch.randn(n_blocks, n_kv, block_size, head_dim, generator=g).to(dtype).to(DEVICE)
        self.v = torch.randn(n_blocks, n_kv, block_size, head_dim, generator=g).to(dtype).to(DEVICE)
        starts = [0]
        for q_len, _ in seqs:
            starts.append(starts[-1] + q_len)
        self.query_start = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.tensor([L for _, L in seqs], dtype=torch.int32, device=DEVICE)
        self.block_tables = tables.to(DEVICE)
        self.max_query_len = max(q for q, _ in seqs)
        self.seqs = seqs
        self.scale = head_dim ** -0.5

    def args(self, q=None, k=None, v=None):
        return (self.q if q is None else q, self.k if k is None else k, self.v if v is None else v,
                self.query_start, self.seq_lens, self.block_tables, self.max_query_len, self.scale)

    def rows(self, b):
        return slice(int(self.query_start[b]), int(self.query_start[b + 1]))
