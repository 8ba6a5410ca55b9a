"""Causal grouped-query attention of new queries over the KV cache.

Query t sits at absolute position positions[t] and sees cache rows 0..positions[t].
Query head h reads KV head h // (n_heads // n_kv_heads). Softmax in fp32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from smollm3_triton.errors import KernelInputError, UnsupportedModelError


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
