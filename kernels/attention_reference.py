"""Causal grouped-query attention over the paged KV cache: the torch reference, `attention_torch`
(the contract every backend keeps; the Triton kernels are in kernels/attention.py).

Sequence b owns query rows query_start[b]:query_start[b+1] (q_len_b rows); its
context is seq_lens[b] tokens, whose K/V sit in the blocks block_tables[b] lists
(block j holds positions j*block_size .. (j+1)*block_size - 1). Query i of
sequence b is at position seq_lens[b] - q_len_b + i and sees positions 0..that
one. Query head h reads KV head h // (n_heads // n_kv_heads). Softmax in fp32.
A sequence with seq_len 0 (padding) gets zeros.
"""
from __future__ import annotations

import torch

# The reference walks keys in chunks of KEY_CHUNK at fixed absolute positions and
# queries in tiles of QUERY_TILE rows, with an online softmax: no [heads, T, L] score
# matrix for a long prompt. Batch invariance: a query row goes through the same
# operations in the same order whatever else is in the batch: its key chunks start at
# the same positions, a chunk past its position is skipped (an exact no-op of the merge),
# and every matmul has at least MIN_ROWS rows (CPU BLAS picks other kernels, with
# other rounding, for fewer rows; from MIN_ROWS on, a row's result is independent of
# the row count and of the batch count of a bmm).
KEY_CHUNK = 512
QUERY_TILE = 512
MIN_ROWS = 16


def _gather_keys(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache [n_blocks, Hkv, bs, D], blocks [B, n] -> [B, Hkv, n * bs, D] in fp32."""
    B, n = blocks.shape
    _, hkv, bs, d = cache.shape
    return cache[blocks].permute(0, 2, 1, 3, 4).reshape(B, hkv, n * bs, d).float()


def _attend_tiles(q: torch.Tensor, qpos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  tables: torch.Tensor) -> torch.Tensor:
    """Online softmax of query tiles over their sequences' key chunks.

    q [B, Hkv, M, D] fp32, already multiplied by the softmax scale (M >= MIN_ROWS; rows
    are (query, head-in-group) pairs), qpos [B, M] position of each row (padding rows
    repeat a real row's), tables [B, max_blocks] -> [B, Hkv, M, D] fp32. A chunk every
    row sees whole skips the mask: masking nothing would change no bit."""
    B, hkv, M, D = q.shape
    bs = k_cache.shape[2]
    per_chunk = KEY_CHUNK // bs
    m = torch.full((B, hkv, M, 1), float("-inf"), device=q.device)
    l = torch.zeros((B, hkv, M, 1), device=q.device)
    acc = torch.zeros((B, hkv, M, D), device=q.device)
    last = qpos.max(dim=1).values                         # the furthest position each tile reads
    n_chunks = int((last.max() + KEY_CHUNK) // KEY_CHUNK) if B else 0
    for c in range(n_chunks):
        start = c * KEY_CHUNK
        active = (last >= start).nonzero().flatten()
        if active.numel() < B:
            if not active.numel():
                continue
            sub = _attend_tiles_chunk(q[active], qpos[active], k_cache, v_cache, tables[active], start,
                                      per_chunk, m[active], l[active], acc[active])
            m[active], l[active], acc[active] = sub
        else:
            m, l, acc = _attend_tiles_chunk(q, qpos, k_cache, v_cache, tables, start, per_chunk, m, l, acc)
    return acc / torch.where(l > 0, l, 1.0)


def _attend_tiles_chunk(q, qpos, k_cache, v_cache, tables, start, per_chunk, m, l, acc):
    first = start // k_cache.shape[2]
    blocks = tables[:, first:first + per_chunk]
    if blocks.shape[1] < per_chunk:                       # the table ends inside this chunk
        blocks = torch.nn.functional.pad(blocks, (0, per_chunk - blocks.shape[1]))
    k = _gather_keys(k_cache, blocks)                      # [B, Hkv, KEY_CHUNK, D]
    v = _gather_keys(v_cache, blocks)
    s = q @ k.transpose(-1, -2)                            # [B, Hkv, M, KEY_CHUNK]; q is pre-scaled
    if start + KEY_CHUNK - 1 > int(qpos.min()):            # some row sees only part of this chunk
        key_pos = start + torch.arange(KEY_CHUNK, device=q.device)
        visible = key_pos[None, None, :] <= qpos[:, :, None]   # [B, M, KEY_CHUNK]
        s = s.masked_fill(~visible[:, None], float("-inf"))
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    shift = torch.where(m_new == float("-inf"), 0.0, m_new)
    p = torch.exp(s - shift)
    alpha = torch.exp(m - shift)
    l = l * alpha + p.sum(-1, keepdim=True)
    acc = acc * alpha + p @ v
    return m_new, l, acc


def attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    max_query_len: int, scale: float) -> torch.Tensor:
    """q [N, H, D]; caches [n_blocks, Hkv, block_size, D]; query_start [B+1]; seq_lens [B];
    block_tables [B, max_blocks] -> out [N, H, D] in q's dtype."""
    N, H, D = q.shape
    hkv = k_cache.shape[1]
    group = H // hkv
    out = torch.zeros((N, H, D), dtype=torch.float32, device=q.device)
    starts = query_start.tolist()
    lens = seq_lens.tolist()
    qf = q.float() * scale
    # Sequences with one query (decodes) go together, one row tile each; longer ones
    # tile by tile. Both run the same _attend_tiles, so a row's result does not depend
    # on which way it went.
    singles = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1 and lens[b] > 0]
    if singles:
        rows = torch.tensor([starts[b] for b in singles], device=q.device)
        tiles = qf[rows].view(len(singles), hkv, group, D)
        tiles = torch.nn.functional.pad(tiles, (0, 0, 0, max(MIN_ROWS - group, 0)))
        qpos = torch.tensor([[lens[b] - 1] * tiles.shape[2] for b in singles],
                            device=q.device)
        o = _attend_tiles(tiles, qpos, k_cache, v_cache, block_tables[singles])
        out[rows] = o[:, :, :group].reshape(len(singles), H, D)
    for b in range(len(lens)):
        n_q = starts[b + 1] - starts[b]
        if n_q <= 1 or lens[b] == 0:
            continue
        for t0 in range(0, n_q, QUERY_TILE):
            r = min(QUERY_TILE, n_q - t0)
            rows = slice(starts[b] + t0, starts[b] + t0 + r)
            tile = qf[rows].view(r, hkv, group, D).permute(1, 0, 2, 3).reshape(1, hkv, r * group, D)
            pad = max(MIN_ROWS - r * group, 0)
            tile = torch.nn.functional.pad(tile, (0, 0, 0, pad))
            pos = lens[b] - n_q + t0 + torch.arange(r, device=q.device).repeat_interleave(group)
            qpos = torch.cat([pos, pos.new_full((pad,), int(pos[-1]))])[None]
            o = _attend_tiles(tile, qpos, k_cache, v_cache, block_tables[b:b + 1])
            out[rows] = o[0, :, :r * group].view(hkv, r, group, D).permute(1, 0, 2, 3).reshape(r, H, D)
    return out.to(q.dtype)
