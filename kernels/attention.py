"""Causal grouped-query attention on Triton: `attention_triton`, which keeps the contract
`attention_torch` states (kernels/attention_reference.py: rows, positions, the paged cache,
grouped heads, padding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError, UnsupportedModelError
from . import gpu
from .fusions import counters
from .pdl import launch_options, release_next, wait_for_inputs

# ---------------------------------------------------------------------------
# Triton kernels. Scores are scaled by scale * log2(e) so the softmax runs on exp2;
# running max, denominator and accumulator stay fp32 whatever the input dtype.
#
# Two kernels share one tile step (_attend_block) and one paged K/V gather (_load_kv):
# - decode (_attn_decode_kernel): every sequence whose step has exactly one query. Program
#   (sequence, KV head, split): the GROUP query heads of that KV head are packed into one
#   >= 16-row tile, so each K/V block is read once for the group. Splits are sized by the
#   sequence's length, read on the device (no host read, capturable in a CUDA graph);
#   splits past it exit at once, and the last live split merges the partials: one launch.
# - prefill (_attn_prefill_kernel): every sequence with two or more queries. Program
#   (query tile of one sequence, KV head): BLOCK_Q queries x GROUP heads in one tile,
#   keys from position 0 (the cached prefix, no mask) through the causal band. The
#   program -> (sequence, tile) map is found on the device by a binary search of
#   query_start (tile slots of sequence b start at query_start[b] // BLOCK_Q + b).
# A step with both kinds launches both; each row is written by exactly one of them, and
# a one-query row always goes through the decode kernel, so a decode token's result
# does not depend on whether other sequences of its step are prefilling.
# Block ids are cast to int64 before they multiply the block stride.

_LOG2E = 1.4426950408889634
_CPU_DECODE_SPLITS = 4
_MAX_DECODE_SPLITS = 128
# Key blocks a decode split takes at least: a split's fixed cost (q, the partial, the merge)
# over 2 blocks. From the length alone (batch invariance), so it trades one sequence's CTAs
# (32 live at context 1024: 4 x 8 splits) against 64 sequences' partials (+150 MB a step);
# bench/README.md has the estimate of both.
_MIN_SPLIT_BLOCKS = 2


@triton.jit
def _attend_block(q, k, v, m_i, l_i, acc, qk_scale, visible,
                  MASKED: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax step of query tile q over a key/value block.

    DOT_F32 runs both products on fp32 operands at fp32 accuracy (3xTF32 on tensor
    cores, not a silent single TF32 pass): for fp32 inputs, and for 16-bit inputs under
    the CPU interpreter, whose dot cannot multiply bfloat16. A product of two 16-bit
    floats is exact in fp32, so that matches the GPU's 16-bit dot up to summation order;
    P is still rounded to V's dtype first, as on the GPU.
    A key block wholly invisible to a row is an exact no-op for that row.
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
def _load_kv(k_ptr, v_ptr, table_row, kj, kv_ok, kvh, stride_kb, stride_kh, stride_ks,
             stride_vb, stride_vh, stride_vs, d, BLOCK_SIZE: tl.constexpr):
    """K and V rows [BLOCK_N, HEAD_DIM] at key positions kj of one sequence, through its
    block table; zeros where not kv_ok. The block id is int64 before the multiply."""
    block = tl.load(table_row + kj // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
    off = (kj % BLOCK_SIZE).to(tl.int64)
    k_row = block * stride_kb + kvh * stride_kh + off * stride_ks
    v_row = block * stride_vb + kvh * stride_vh + off * stride_vs
    k = tl.load(k_ptr + k_row[:, None] + d[None, :], mask=kv_ok[:, None], other=0.0)
    v = tl.load(v_ptr + v_row[:, None] + d[None, :], mask=kv_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _attn_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qs_ptr, lens_ptr, bt_ptr, n_seqs, qk_scale,
                         stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                         stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """FlashAttention-2 forward over the paged cache for sequences with >= 2 queries:
    program (tile slot, KV head); the tile's rows are (query, head of the group) pairs."""
    slot = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    # The sequence owning this tile slot: the last b with query_start[b] // BLOCK_Q + b <= slot.
    lo = 0
    hi = n_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        first = tl.load(qs_ptr + mid) // BLOCK_Q + mid
        if first <= slot:
            lo = mid
        else:
            hi = mid
    b = lo
    q0 = tl.load(qs_ptr + b)
    q_len = tl.load(qs_ptr + b + 1) - q0
    tile = slot - (q0 // BLOCK_Q + b)
    seq_len = tl.load(lens_ptr + b)
    # One-query sequences are the decode kernel's; a slot past the sequence's tiles is idle.
    if (q_len >= 2) & (tile * BLOCK_Q < q_len):
        r = tl.arange(0, BLOCK_M)
        qi = tile * BLOCK_Q + r // GROUP                  # query index inside the sequence
        row_ok = (r < BLOCK_Q * GROUP) & (qi < q_len)
        h = kvh * GROUP + r % GROUP
        t = (q0 + qi).to(tl.int64)
        pos = tl.where(row_ok, seq_len - q_len + qi, -1)
        d = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        table_row = bt_ptr + b.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # Keys every row sees (the cached prefix and the tile's lower triangle) need no
        # mask; the band up to the tile's last position does.
        first_pos = seq_len - q_len + tile * BLOCK_Q
        last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
        full_end = tl.maximum(first_pos + 1, 0) // BLOCK_N * BLOCK_N
        kv_end = last_pos + 1
        for start in range(0, full_end, BLOCK_N):
            kj = start + cols
            k, v = _load_kv(k_ptr, v_ptr, table_row, kj, kj < kv_end, kvh, stride_kb, stride_kh, stride_ks,
                            stride_vb, stride_vh, stride_vs, d, BLOCK_SIZE)
            m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, qk_scale, None,
                                          MASKED=False, DOT_F32=DOT_F32)
        for start in range(full_end, kv_end, BLOCK_N):
            kj = start + cols
            k, v = _load_kv(k_ptr, v_ptr, table_row, kj, kj < kv_end, kvh, stride_kb, stride_kh, stride_ks,
                            stride_vb, stride_vh, stride_vs, d, BLOCK_SIZE)
            m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, qk_scale, kj[None, :] <= pos[:, None],
                                          MASKED=True, DOT_F32=DOT_F32)
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_decode_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, lens_ptr, bt_ptr, part_o_ptr, part_lse_ptr, o_ptr, count_ptr,
                        n_heads, n_splits, want_splits, qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                        stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
                        MIN_BLOCKS: tl.constexpr, PDL: tl.constexpr = False):
    """Flash-decoding: program (sequence, KV head, split) packs the GROUP query heads that read this
    KV head into one tile. Splits are sized by the sequence's own length (chunk =
    ceil(len / want_splits) rounded up to BLOCK_N, at least MIN_BLOCKS key blocks), so a short
    context wakes few of them: the others exit at once. Each live split stores a normalised partial output and its
    log2-sum-exp; the last live split to finish (a counter per sequence and KV head) merges
    them in split order and writes the output. A sequence with no key (seq_len 0: padding)
    gets zeros; sequences with another query count are the prefill kernel's. PDL: launched with
    programmatic dependent launch (kernels/pdl.py)."""
    wait_for_inputs(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q0 = tl.load(qs_ptr + b)
    q_len = tl.load(qs_ptr + b + 1) - q0
    # The valid length comes from the device, never the host: no host read, capturable in a
    # CUDA graph, and a sequence's splits depend on nothing but its length (batch invariance).
    kv_len = tl.where(q_len == 1, tl.load(lens_ptr + b), 0)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(kv_len, want_splits), BLOCK_N), MIN_BLOCKS) * BLOCK_N
    live = tl.cdiv(kv_len, tl.maximum(chunk, 1))
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP
    h = kvh * GROUP + r
    d = tl.arange(0, HEAD_DIM)
    out_rows = o_ptr + q0.to(tl.int64) * stride_ot + h[:, None] * stride_oh + d[None, :]
    if split < live:
        cols = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + q0.to(tl.int64) * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        start = split * chunk
        end = tl.minimum(start + chunk, kv_len)
        table_row = bt_ptr + b.to(tl.int64) * stride_bt
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for s in range(start, end, BLOCK_N):
            kj = s + cols
            kv_ok = kj < end
            k, v = _load_kv(k_ptr, v_ptr, table_row, kj, kv_ok, kvh.to(tl.int64), stride_kb, stride_kh, stride_ks,
                            stride_vb, stride_vh, stride_vs, d, BLOCK_SIZE)
            m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, qk_scale, kv_ok[None, :],
                                          MASKED=True, DOT_F32=DOT_F32)
        release_next(PDL)
        seen = l_i > 0.0
        part = (b.to(tl.int64) * n_heads + h) * n_splits + split
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / tl.where(seen, l_i, 1.0)[:, None],
                 mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
                 mask=row_ok)
        tl.debug_barrier()
        counter = count_ptr + b * tl.num_programs(1) + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == live - 1:
            # Merge: weights exp2(lse - max lse) over the live splits, in split order.
            first = (b.to(tl.int64) * n_heads + h) * n_splits
            top = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for t in range(0, live):
                top = tl.maximum(top, tl.load(part_lse_ptr + first + t, mask=row_ok, other=float("-inf"),
                                              cache_modifier=".cg"))
            shift = tl.where(top == float("-inf"), 0.0, top)
            total = tl.zeros([BLOCK_M], tl.float32)
            out = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            for t in range(0, live):
                lse = tl.load(part_lse_ptr + first + t, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - shift))
                o = tl.load(part_o_ptr + (first + t)[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None],
                            other=0.0, cache_modifier=".cg")
                out += o * w[:, None]
                total += w
            out = out / tl.where(total > 0.0, total, 1.0)[:, None]
            tl.store(out_rows, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.atomic_xchg(counter, 0)
    elif (split == 0) & (q_len == 1) & (live == 0):
        tl.store(out_rows, tl.zeros([BLOCK_M, HEAD_DIM], o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _check_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start: torch.Tensor,
                          seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise KernelInputError(f"attention: q must be [N, n_heads, head_dim] with unit last stride, got "
                               f"{tuple(q.shape)} strides {q.stride()}")
    N, H, D = q.shape
    if D < 16 or D > 128 or D & (D - 1):
        raise UnsupportedModelError(f"attention: head_dim {D} is not a power of two in [16, 128]")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedModelError(f"attention: q dtype {q.dtype} is not float32, float16 or bfloat16")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[3] != D or c.stride(3) != 1 or c.dtype != q.dtype:
            raise KernelInputError(f"attention: {name} must be [n_blocks, n_kv_heads, block_size, {D}] of q's dtype "
                                   f"{q.dtype} with unit last stride, got {c.dtype} {tuple(c.shape)} "
                                   f"strides {c.stride()}")
    if v_cache.shape != k_cache.shape:
        raise KernelInputError(f"attention: v_cache {tuple(v_cache.shape)} and k_cache {tuple(k_cache.shape)} differ")
    bs = k_cache.shape[2]
    if bs & (bs - 1):
        raise KernelInputError(f"attention: block_size {bs} is not a power of two")
    if H % k_cache.shape[1]:
        raise KernelInputError(f"attention: {H} query heads are not a multiple of {k_cache.shape[1]} KV heads")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("query_start", query_start),
                    ("seq_lens", seq_lens), ("block_tables", block_tables)):
        if t.device != q.device:
            raise KernelInputError(f"attention: {name} is on {t.device}, q on {q.device}")
    B = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or seq_lens.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"attention: seq_lens must be a 1-D int tensor, got {seq_lens.dtype} "
                               f"{tuple(seq_lens.shape)}")
    if query_start.shape != (B + 1,) or query_start.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"attention: query_start must be an int tensor of shape ({B + 1},), "
                               f"got {query_start.dtype} {tuple(query_start.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or \
            block_tables.dtype not in (torch.int32, torch.int64) or block_tables.stride(1) != 1:
        raise KernelInputError(f"attention: block_tables must be an int [{B}, max_blocks] tensor with unit "
                               f"last stride, got {block_tables.dtype} {tuple(block_tables.shape)}")
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        raise KernelInputError(f"attention: max_query_len must be an int >= 0, got {max_query_len!r}")


# Tile configs, chosen so that ptxas reports no spills for sm_80 and sm_90
# (tests/test_compile_attention.py prints the table). `arch` is the compute capability
# (80, 90, ...) or None for the CPU interpreter, whose cost is per op: few, big blocks.
# fp32 runs its dots as 3xTF32 on tensor cores and needs smaller tiles.

def _prefill_config(head_dim: int, dtype: torch.dtype, arch: int | None) -> dict:
    """BLOCK_M rows = (queries, heads of a group) pairs; BLOCK_N keys per step."""
    if arch is None:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # 3xTF32 splits both operands: at head_dim 128 a 32x32 tile spills, and triton 3.6 (the
        # GPU machines') spills a 32x16 one too.
        if head_dim <= 64:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    if head_dim <= 64:
        # sm_80 spills the paged 128x64 tile at 4 warps (the per-key block gather costs registers).
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4 if arch >= 90 else 8, num_stages=3)
    # head_dim 128: sm_80's register file spills a 128x64 tile at 8 warps.
    return dict(BLOCK_M=128, BLOCK_N=64 if arch >= 90 else 32, num_warps=8, num_stages=3)


def _prefill_block_q(block_m: int, group: int) -> int:
    """Queries per prefill tile: as many whole GROUPs as fit BLOCK_M rows."""
    if group > block_m:
        raise UnsupportedModelError(f"attention: a GQA group of {group} heads exceeds the {block_m}-row tile")
    return block_m // group


def _decode_config(head_dim: int, dtype: torch.dtype, arch: int | None) -> dict:
    if arch is None:
        return dict(BLOCK_N=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # 8 warps: with 4, triton 3.6 spills on sm_80.
        return dict(BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def _decode_block_m(group: int) -> int:
    """Rows of the decode tile: the group, padded to >= 16 for tl.dot."""
    return max(16, triton.next_power_of_2(group))


def decode_splits(n_kv_heads: int, capacity: int, block_n: int, sm_count: int | None) -> tuple[int, int]:
    """(want, grid): a sequence of length L is cut into ceil(L / chunk) live splits, chunk =
    ceil(L / want) rounded up to block_n, want sized to fill the GPU about twice over with the
    KV heads of ONE sequence; the grid has room for the most any length within the block
    table's capacity can have (the host cannot read the lengths without a sync). A
    sequence's splits depend on its length and the GPU only: the same in any batch (batch
    invariance) and in every CUDA-graph bucket. Without a GPU (sm_count None) a fixed small
    count still exercises the merge."""
    want = _CPU_DECODE_SPLITS if sm_count is None else min(triton.cdiv(2 * sm_count, n_kv_heads), _MAX_DECODE_SPLITS)
    return want, max(1, min(want, triton.cdiv(capacity, block_n)))


def attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     query_start: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                     max_query_len: int, scale: float) -> torch.Tensor:
    """Same contract as attention_torch. Reads no device value on the host: with
    max_query_len == 1 it is one launch, graph-capturable."""
    _check_attention_args(q, k_cache, v_cache, query_start, seq_lens, block_tables, max_query_len)
    N, H, D = q.shape
    n_kv, bs = k_cache.shape[1], k_cache.shape[2]
    group = H // n_kv
    B = seq_lens.shape[0]
    # Every row belongs to a sequence and is written by one kernel; zeros only matter
    # for rows of a malformed batch (query_start not covering N).
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    if N == 0 or B == 0:
        return out.zero_()
    query_start, seq_lens = query_start.contiguous(), seq_lens.contiguous()
    qk_scale = float(scale) * _LOG2E
    arch, sm_count = gpu.arch_and_sms(q.device)
    # fp32 operands for fp32 tensors and under the interpreter (no GPU: arch None); read from
    # the arch, not the device, so bench.static_report compiles what the GPU would run.
    dot_f32 = q.dtype == torch.float32 or arch is None
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))

    # Decode rows (one-query sequences): launched for every step that may hold one.
    if max_query_len <= 1 or B > 1:
        cfg = _decode_config(D, q.dtype, arch)
        want, n_splits = decode_splits(n_kv, block_tables.shape[1] * bs, cfg["BLOCK_N"], sm_count)
        part_o = torch.empty((B, H, n_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, n_splits), dtype=torch.float32, device=q.device)
        _attn_decode_kernel[(B, n_kv, n_splits)](
            q, k_cache, v_cache, query_start, seq_lens, block_tables, part_o, part_lse, out,
            counters(q.device, B * n_kv), H, n_splits, want, qk_scale, q.stride(0), q.stride(1), out.stride(0),
            out.stride(1), block_tables.stride(0), *cache_strides,
            GROUP=group, HEAD_DIM=D, BLOCK_SIZE=bs, BLOCK_M=_decode_block_m(group), DOT_F32=dot_f32,
            MIN_BLOCKS=_MIN_SPLIT_BLOCKS, **cfg, **launch_options(q.device), **gpu.FP_FUSION)
    if max_query_len >= 2:
        cfg = _prefill_config(D, q.dtype, arch)
        block_q = _prefill_block_q(cfg["BLOCK_M"], group)
        # Tile slots: sequence b's start at query_start[b] // block_q + b, so N // block_q + B
        # slots cover every sequence's tiles (the idle ones return at once).
        grid = (N // block_q + B, n_kv)
        _attn_prefill_kernel[grid](
            q, k_cache, v_cache, out, query_start, seq_lens, block_tables, B, qk_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), *cache_strides,
            GROUP=group, HEAD_DIM=D, BLOCK_SIZE=bs, BLOCK_Q=block_q, DOT_F32=dot_f32, **cfg, **gpu.FP_FUSION)
    return out
