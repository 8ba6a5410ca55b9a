"""Causal grouped-query attention of a flattened batch of sequences over the paged KV cache.

Sequence b owns query rows query_start[b]:query_start[b+1] (q_len_b rows); its
context is seq_lens[b] tokens, whose K/V sit in the blocks block_tables[b] lists
(block j holds positions j*block_size .. (j+1)*block_size - 1). Query i of
sequence b is at position seq_lens[b] - q_len_b + i and sees positions 0..that
one. Query head h reads KV head h // (n_heads // n_kv_heads). Softmax in fp32.
A sequence with seq_len 0 (padding) gets zeros.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from smollm3_triton.errors import KernelInputError, UnsupportedModelError

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
                  tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Online softmax of query tiles over their sequences' key chunks.

    q [B, Hkv, M, D] fp32 (M >= MIN_ROWS; rows are (query, head-in-group) pairs),
    qpos [B, M] position of each row (-1: sees nothing), tables [B, max_blocks]
    -> [B, Hkv, M, D] fp32."""
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
                                      per_chunk, scale, m[active], l[active], acc[active])
            m[active], l[active], acc[active] = sub
        else:
            m, l, acc = _attend_tiles_chunk(q, qpos, k_cache, v_cache, tables, start, per_chunk, scale, m, l, acc)
    return acc / torch.where(l > 0, l, 1.0)


def _attend_tiles_chunk(q, qpos, k_cache, v_cache, tables, start, per_chunk, scale, m, l, acc):
    first = start // k_cache.shape[2]
    blocks = tables[:, first:first + per_chunk]
    if blocks.shape[1] < per_chunk:                       # the table ends inside this chunk
        blocks = torch.nn.functional.pad(blocks, (0, per_chunk - blocks.shape[1]))
    k = _gather_keys(k_cache, blocks)                      # [B, Hkv, KEY_CHUNK, D]
    v = _gather_keys(v_cache, blocks)
    s = (q @ k.transpose(-1, -2)) * scale                  # [B, Hkv, M, KEY_CHUNK]
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
    qf = q.float()
    # Sequences with one query (decodes) go together, one row tile each; longer ones
    # tile by tile. Both run the same _attend_tiles, so a row's result does not depend
    # on which way it went.
    singles = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1 and lens[b] > 0]
    if singles:
        rows = torch.tensor([starts[b] for b in singles], device=q.device)
        tiles = qf[rows].view(len(singles), hkv, group, D)
        tiles = torch.nn.functional.pad(tiles, (0, 0, 0, max(MIN_ROWS - group, 0)))
        qpos = torch.tensor([[lens[b] - 1] * group + [-1] * (tiles.shape[2] - group) for b in singles],
                            device=q.device)
        o = _attend_tiles(tiles, qpos, k_cache, v_cache, block_tables[singles], scale)
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
            qpos = torch.cat([pos, pos.new_full((pad,), -1)])[None]
            o = _attend_tiles(tile, qpos, k_cache, v_cache, block_tables[b:b + 1], scale)
            out[rows] = o[0, :, :r * group].view(hkv, r, group, D).permute(1, 0, 2, 3).reshape(r, H, D)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------
# Triton kernels. Scores are scaled by scale * log2(e) so the softmax runs on exp2;
# running max, denominator and accumulator stay fp32 whatever the input dtype.

_LOG2E = 1.4426950408889634
# Decode tiles pack T * group query rows of one KV head; above this many rows the
# prefill kernel (one head per program, BLOCK_M query rows) takes over.
_DECODE_MAX_ROWS = 64
_CPU_DECODE_SPLITS = 4
_MAX_DECODE_SPLITS = 128


@triton.jit
def _attend_block(q, k, v, m_i, l_i, acc, qk_scale, visible,
                  MASKED: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax step of query tile q over a key/value block.

    DOT_F32 runs both products on fp32 operands at fp32 accuracy (3xTF32 on tensor
    cores, not a silent single TF32 pass): for fp32 inputs, and for 16-bit inputs under
    the CPU interpreter, whose dot cannot multiply bfloat16. A product of two 16-bit
    floats is exact in fp32, so that matches the GPU's 16-bit dot up to summation order;
    P is still rounded to V's dtype first, as on the GPU.
    """
    if DOT_F32:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="tf32x3")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * qk_scale
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    # A row that has seen no visible key yet (a decode split beyond its position, a
    # padding row) keeps m = -inf; shifting by 0 instead keeps exp2 away from inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)
    if DOT_F32:
        pv = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="tf32x3")
    else:
        pv = tl.dot(p, v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _attn_prefill_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, T, qk_scale,
                         stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                         stride_ot, stride_oh,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """FlashAttention-2 forward: program (query tile, query head) sweeps the cache rows
    its tile can see, the ones every row sees without a mask, the diagonal band with."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = (h // GROUP).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Positions are read here, on the device; they need not be contiguous or sorted.
    full_end = (tl.min(tl.where(row_ok, pos, 2147483647), axis=0) + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.max(pos, axis=0) + 1
    for start in range(0, full_end, BLOCK_N):
        kj = start + cols
        k = tl.load(k_base + kj[:, None] * stride_ks + d[None, :])
        v = tl.load(v_base + kj[:, None] * stride_vs + d[None, :])
        m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, qk_scale, None,
                                      MASKED=False, DOT_F32=DOT_F32)
    for start in range(full_end, kv_end, BLOCK_N):
        kj = start + cols
        kv_ok = (kj < kv_end)[:, None]
        k = tl.load(k_base + kj[:, None] * stride_ks + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + kj[:, None] * stride_vs + d[None, :], mask=kv_ok, other=0.0)
        m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, qk_scale, kj[None, :] <= pos[:, None],
                                      MASKED=True, DOT_F32=DOT_F32)
    out = acc / l_i[:, None]
    tl.store(o_ptr + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_decode_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_o_ptr, part_lse_ptr,
                              T, n_heads, n_splits, qk_scale,
                              stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """Flash-decoding, split phase: program (KV head, split) packs the T * GROUP query
    rows that read this KV head into one tile, so each K/V block is loaded once for the
    whole group, and writes a normalised partial output and its log2-sum-exp."""
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    row_ok = r < T * GROUP
    t = r // GROUP
    h = kvh * GROUP + r % GROUP
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    pos = tl.load(pos_ptr + t, mask=row_ok, other=0).to(tl.int32)
    q = tl.load(q_ptr + t[:, None].to(tl.int64) * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    # The valid length comes from the device, never the host: the split size follows
    # it, so a short context only wakes the first few splits.
    kv_len = tl.max(pos, axis=0) + 1
    chunk = tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for s in range(start, end, BLOCK_N):
        kj = s + cols
        kv_ok = (kj < end)[:, None]
        k = tl.load(k_base + kj[:, None] * stride_ks + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + kj[:, None] * stride_vs + d[None, :], mask=kv_ok, other=0.0)
        m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, qk_scale, kj[None, :] <= pos[:, None],
                                      MASKED=True, DOT_F32=DOT_F32)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (t.to(tl.int64) * n_heads + h) * n_splits + split
    tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
    tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _attn_decode_merge_kernel(part_o_ptr, part_lse_ptr, o_ptr, n_heads, n_splits, stride_ot, stride_oh,
                              HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """Flash-decoding, reduce phase: one program per (token, head) weighs the splits'
    partial outputs by exp2(lse - max lse). Split 0 always holds key 0, which every
    query sees, so the max is finite and empty splits weigh exactly 0."""
    row = tl.program_id(0).to(tl.int64)
    t = row // n_heads
    h = row % n_heads
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + row * n_splits + s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(part_o_ptr + (row * n_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def _check_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          positions: torch.Tensor) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise KernelInputError(f"attention: q must be [T, n_heads, head_dim] with unit last stride, got "
                               f"{tuple(q.shape)} strides {q.stride()}")
    T, H, D = q.shape
    if D < 16 or D > 128 or D & (D - 1):
        raise UnsupportedModelError(f"attention: head_dim {D} is not a power of two in [16, 128]")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedModelError(f"attention: q dtype {q.dtype} is not float32, float16 or bfloat16")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or c.shape[2] != D or c.stride(2) != 1 or c.dtype != q.dtype:
            raise KernelInputError(f"attention: {name} must be [n_kv_heads, max_seq, {D}] of q's dtype {q.dtype} "
                                   f"with unit last stride, got {c.dtype} {tuple(c.shape)} strides {c.stride()}")
    if v_cache.shape != k_cache.shape:
        raise KernelInputError(f"attention: v_cache {tuple(v_cache.shape)} and k_cache {tuple(k_cache.shape)} differ")
    if H % k_cache.shape[0]:
        raise KernelInputError(f"attention: {H} query heads are not a multiple of {k_cache.shape[0]} KV heads")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("positions", positions)):
        if t.device != q.device:
            raise KernelInputError(f"attention: {name} is on {t.device}, q on {q.device}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"attention: positions must be an int tensor of shape ({T},), "
                               f"got {positions.dtype} {tuple(positions.shape)}")


# Tile configs, chosen so that ptxas reports no spills for sm_80 and sm_90
# (tests/test_compile_attention.py prints the table). `arch` is the compute capability
# (80, 90, ...) or None for the CPU interpreter, whose cost is per op: few, big blocks.
# fp32 runs its dots as 3xTF32 on tensor cores and needs smaller tiles.

def _prefill_config(head_dim: int, dtype: torch.dtype, arch: int | None) -> dict:
    if arch is None:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    # head_dim 128: sm_80's register file spills a 128x64 tile at 8 warps.
    return dict(BLOCK_M=128, BLOCK_N=64 if arch >= 90 else 32, num_warps=8, num_stages=3)


def _decode_config(head_dim: int, dtype: torch.dtype, arch: int | None) -> dict:
    if arch is None:
        return dict(BLOCK_N=256, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def _decode_max_rows(dtype: torch.dtype) -> int:
    """Largest T * group the packed decode tile takes; more rows go to the prefill kernel.
    An fp32 tile of 64 rows spills, so fp32 packs at most 16."""
    return 16 if dtype == torch.float32 else _DECODE_MAX_ROWS


@functools.lru_cache(maxsize=None)
def _device_info(device_index: int) -> tuple[int, int]:
    """(compute capability as 80/90/..., SM count)."""
    props = torch.cuda.get_device_properties(device_index)
    return props.major * 10 + props.minor, props.multi_processor_count


def _arch_and_sms(device: torch.device) -> tuple[int | None, int | None]:
    if device.type != "cuda":
        return None, None
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())


def _decode_splits(n_kv_heads: int, max_seq: int, block_n: int, sm_count: int | None) -> int:
    """How many splits to launch. The host knows only the cache's capacity (reading the
    context length would sync), so this is an upper bound sized to fill the GPU about
    twice over; the kernel shrinks the splits' reach to the real length. Without a GPU
    (sm_count None) a fixed small count still exercises the merge."""
    if sm_count is None:
        return _CPU_DECODE_SPLITS
    wanted = triton.cdiv(2 * sm_count, n_kv_heads)
    return max(1, min(wanted, _MAX_DECODE_SPLITS, triton.cdiv(max_seq, block_n)))


def _merge_warps(block_s: int, head_dim: int) -> int:
    # The [BLOCK_S, HEAD_DIM] fp32 partial tile lives in registers: ~64 per thread at most.
    return 4 if block_s * head_dim <= 8192 else 8


def attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D]; caches [Hkv, S, D]; positions [T] -> out [T, H, D] in q's dtype."""
    _check_attention_args(q, k_cache, v_cache, positions)
    T, H, D = q.shape
    n_kv = k_cache.shape[0]
    group = H // n_kv
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    positions = positions.contiguous()
    qk_scale = float(scale) * _LOG2E
    dot_f32 = q.dtype == torch.float32 or q.device.type != "cuda"
    arch, sm_count = _arch_and_sms(q.device)
    if T * group <= _decode_max_rows(q.dtype):
        cfg = _decode_config(D, q.dtype, arch)
        n_splits = _decode_splits(n_kv, k_cache.shape[1], cfg["BLOCK_N"], sm_count)
        part_o = torch.empty((T, H, n_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((T, H, n_splits), dtype=torch.float32, device=q.device)
        _attn_decode_split_kernel[(n_kv, n_splits)](
            q, k_cache, v_cache, positions, part_o, part_lse, T, H, n_splits, qk_scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            GROUP=group, HEAD_DIM=D, BLOCK_M=max(16, triton.next_power_of_2(T * group)),
            DOT_F32=dot_f32, **cfg)
        block_s = triton.next_power_of_2(n_splits)
        _attn_decode_merge_kernel[(T * H,)](
            part_o, part_lse, out, H, n_splits, out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_S=block_s, num_warps=_merge_warps(block_s, D))
    else:
        cfg = _prefill_config(D, q.dtype, arch)
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), H)
        _attn_prefill_kernel[grid](
            q, k_cache, v_cache, positions, out, T, qk_scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            out.stride(0), out.stride(1),
            GROUP=group, HEAD_DIM=D, DOT_F32=dot_f32, **cfg)
    return out
