"""What the matmul kernels (kernels/qmatmul.py) do to their input before and to their output
after, so that a decode layer is five launches instead of ten.

Prologue (NORM): x = RMSNorm(h) computed while loading x: round(h * inv_rms[m] * w[k]) in h's
dtype, exactly as kernels/rms_norm.py writes it, with inv_rms from the producer of h.

Epilogues, run by the program that completes a unit of output rows (the last K-slice to
finish in decode, the only program in prefill), on the fp32 sums of that unit:
- STORE: y = round(sum).
- SWIGLU: y = round(silu(gate) * up) (gate and up units paired).
- RESIDUAL: the residual stream h += round(sum) (rounded to h's dtype, as the unfused add of
  two dtype tensors), each row's sum of squares of the unit's new h stored; the last unit
  of the launch sums them in unit order into inv_rms = 1 / sqrt(sum / N + eps) for the
  next matmul's NORM prologue (kernels/rms_norm.py's formula).
- ROPE_KV: the QKV projection's q, k, v rounded to x's dtype, q and k rotated (RoPE, fp32,
  rounded back, as kernels/rope_qkv.py's reference), q written out and k, v into the paged
  cache at their slots (slot -1 or out of range: not written).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .qdecode import round_to

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, need: int) -> torch.Tensor:
    """Zeroed int32 counters for "the last program to finish does the epilogue" (matmul units,
    attention merges). Every launch leaves the ones it used at zero, so launches on one stream
    share them. Allocated once per device, before any CUDA-graph capture (warm-up runs first)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < need:
        buf = _COUNTERS[device] = torch.zeros(max(1 << 16, need), dtype=torch.int32, device=device)
    return buf


STORE = tl.constexpr(0)
SWIGLU = tl.constexpr(1)
RESIDUAL = tl.constexpr(2)
ROPE_KV = tl.constexpr(3)


@triton.jit
def x_chunk(x_ptr, stride_xm, m, m_ok, k0, K, NORM: tl.constexpr, norm, DTYPE: tl.constexpr):
    """x[m, k0 : k0 + 16] as a dot's right operand [16, rows m] in DTYPE (0 outside); with
    NORM, x is RMSNorm(h): norm = (inv_rms pointer, norm weight pointer)."""
    k = k0 + tl.arange(0, 16)
    k_ok = k < K
    x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                other=0.0)
    if NORM:
        inv_ptr, w_ptr = norm
        inv = tl.load(inv_ptr + m, mask=m_ok, other=0.0)
        w = tl.load(w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        x = round_to(x.to(tl.float32) * inv[:, None] * w[None, :], x_ptr.dtype.element_ty)
    return tl.trans(x.to(DTYPE))


@triton.jit
def residual_rows(value, m, M, col, ok, unit, h_ptr, stride_h, sq_ptr):
    """h[m, col] += round(value) for a unit's rows col (value fp32 [cols, rows m]); the new h's sum
    of squares over these columns, per row, into sq[unit, m]."""
    dst = h_ptr + m.to(tl.int64)[None, :] * stride_h + col[:, None]
    mask = (m < M)[None, :] & ok[:, None]
    dtype: tl.constexpr = h_ptr.dtype.element_ty
    h = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    h = round_to(h + round_to(value, dtype).to(tl.float32), dtype)
    tl.store(dst, h, mask=mask)
    hf = tl.where(mask, h.to(tl.float32), 0.0)
    tl.store(sq_ptr + m.to(tl.int64) + unit * M, tl.sum(hf * hf, axis=0), mask=m < M)


@triton.jit
def rms_from_squares(sq_ptr, inv_ptr, units, M, row0, ROWS: tl.constexpr, N, eps):
    """inv_rms[m] = 1 / sqrt(sum over units, in order, of sq[unit, m] / N + eps), rows row0 .. row0 + ROWS - 1."""
    m = row0 + tl.arange(0, ROWS)
    acc = tl.zeros([ROWS], tl.float32)
    for u in range(0, units):
        acc += tl.load(sq_ptr + u * M + m, mask=m < M, other=0.0, cache_modifier=".cg")
    tl.store(inv_ptr + m, 1.0 / tl.sqrt(acc / N + eps), mask=m < M)


@triton.jit
def rope_pairs(UNIT_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows (within a unit of whole heads) of each RoPE pair's first element, and the index i of
    the pair in its head: the second element is row + HEAD_DIM // 2."""
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, UNIT_ROWS // 2)
    return (j // HALF) * HEAD_DIM + j % HALF, j % HALF


@triton.jit
def rope_kv_rows(x1, x2, row1, valid, i, m, M, rope, N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_ROPE: tl.constexpr, DTYPE: tl.constexpr):
    """Pairs (x1, x2) fp32 [pairs, rows m] at QKV rows row1 and row1 + HEAD_DIM // 2 (pair index i
    in the head; pairs not `valid` are not this launch's): RoPE on q and k heads, then q out and
    k / v into the paged cache."""
    (pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_cs, n_positions, n_slots, q_ptr, stride_qt,
     k_ptr, v_ptr, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs) = rope
    HALF: tl.constexpr = HEAD_DIM // 2
    m_ok = m < M
    pos = tl.load(pos_ptr + m, mask=m_ok, other=0)
    slot = tl.load(slot_ptr + m, mask=m_ok, other=-1).to(tl.int64)
    pos_ok = (pos >= 0) & (pos < n_positions)
    write_ok = m_ok & pos_ok & (slot >= 0) & (slot < n_slots)
    head = row1 // HEAD_DIM
    a = round_to(x1, DTYPE)
    b = round_to(x2, DTYPE)
    if USE_ROPE:
        c = tl.load(cos_ptr + pos[None, :] * stride_cs + i[:, None], mask=pos_ok[None, :], other=0.0)
        s = tl.load(sin_ptr + pos[None, :] * stride_cs + i[:, None], mask=pos_ok[None, :], other=0.0)
        af, bf = a.to(tl.float32), b.to(tl.float32)
        rotate = (head < N_HEADS + N_KV_HEADS)[:, None]
        a = tl.where(rotate, round_to(af * c - bf * s, DTYPE), a)
        b = tl.where(rotate, round_to(bf * c + af * s, DTYPE), b)
    is_q = ((head < N_HEADS) & valid)[:, None] & m_ok[None, :]
    dst = q_ptr + m.to(tl.int64)[None, :] * stride_qt + (head * HEAD_DIM + i)[:, None]
    tl.store(dst, a, mask=is_q)
    tl.store(dst + HALF, b, mask=is_q)
    # int64 block offsets: block * stride crosses 2^31 elements in a large pool.
    block = tl.where(write_ok, slot // BLOCK_SIZE, 0)[None, :]
    offset = tl.where(write_ok, slot % BLOCK_SIZE, 0)[None, :]
    kv = head - N_HEADS
    is_k = ((kv >= 0) & (kv < N_KV_HEADS) & valid)[:, None] & write_ok[None, :]
    kh = tl.where(kv < N_KV_HEADS, kv, 0).to(tl.int64)[:, None]
    dst = k_ptr + block * stride_kb + kh * stride_kh + offset * stride_ks + i[:, None]
    tl.store(dst, a.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(dst + HALF, b.to(k_ptr.dtype.element_ty), mask=is_k)
    vh = kv - N_KV_HEADS
    is_v = ((vh >= 0) & (vh < N_KV_HEADS) & valid)[:, None] & write_ok[None, :]
    vh = tl.where(is_v, vh[:, None], 0).to(tl.int64)
    dst = v_ptr + block * stride_vb + vh * stride_vh + offset * stride_vs + i[:, None]
    tl.store(dst, a.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(dst + HALF, b.to(v_ptr.dtype.element_ty), mask=is_v)
