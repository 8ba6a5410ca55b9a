"""Fused QKV projection, RoPE (or passthrough on NoPE layers), and the KV-cache write.

Layout: the fused weight stacks Q rows ([n_heads * head_dim]), then K, then V
([n_kv_heads * head_dim] each), all in the half-split ("rotate_half") RoPE
layout of Hugging Face checkpoints; GGUF's interleaved rows are reordered at load.

RoPE at position p rotates each pair (x[i], x[i + d/2]) by angle p * inv_freq[i]:
    x'[i]       = x[i] cos - x[i + d/2] sin
    x'[i + d/2] = x[i + d/2] cos + x[i] sin
cos/sin come from a table [max_seq, d/2] built in float64 at load (positions reach
128k and rope_theta is 5e6, so fp32 angles would drift).

The caches are paged, [n_blocks, n_kv_heads, block_size, head_dim]; k and v of
token t go to slot slot_mapping[t] (= block * block_size + offset; -1: not written).
Returns q [T, n_heads, head_dim].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError, UnsupportedModelError
from ..gguf.tensors import Weight
from .qmatmul import qmatmul_torch, qmatmul_triton

# The one place the Triton path does its QKV GEMV/GEMM (then a second launch rotates
# and writes the cache). The next step moves the RoPE + KV write into that kernel's
# epilogue, saving the launch and the qkv round trip through memory.
_qkv_projection = qmatmul_triton


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, D/2] (already gathered at the positions)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v [N, Hkv, D] into the paged caches [n_blocks, Hkv, block_size, D] at their
    slots (block * block_size + offset); slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = k_cache.shape[2]
    blocks, offsets = slots // bs, slots % bs
    k_cache[blocks, :, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v[keep].to(v_cache.dtype)


def rope_qkv_torch(x: torch.Tensor, w_qkv: Weight, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
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
    write_kv_torch(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _rope_kv_write_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                          n_positions, n_slots, stride_qkv, stride_q,
                          stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_cs,
                          N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, USE_ROPE: tl.constexpr):
    """One token's slice of heads: q, k and v heads are rows of one [BLOCK_H, HALF] tile
    (the two halves of the head loaded separately), so one launch serves all three.
    K/V go to cache slot slot_mapping[t] = block * BLOCK_SIZE + offset (-1: not written)."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF)
    in_range = heads < N_HEADS + 2 * N_KV_HEADS
    src = qkv_ptr + t * stride_qkv + heads[:, None] * (2 * HALF) + i[None, :]
    x1 = tl.load(src, mask=in_range[:, None], other=0.0)
    x2 = tl.load(src + HALF, mask=in_range[:, None], other=0.0)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # A position past the RoPE tables or a slot outside the pool would read or write out
    # of bounds: that token's K/V write is dropped instead (the engine never sends one;
    # slot -1 is its "do not write"). Kept as integer limits: the interpreter mishandles
    # a scalar bool in a mask.
    pos_ok = (pos >= 0) & (pos < n_positions)
    write_ok = pos_ok & (slot >= 0) & (slot < n_slots)
    kv_heads_written = tl.where(write_ok, N_KV_HEADS, 0)
    if USE_ROPE:
        row_ok = i < tl.where(pos_ok, HALF, 0)
        c = tl.load(cos_ptr + pos * stride_cs + i, mask=row_ok, other=0.0)[None, :]
        s = tl.load(sin_ptr + pos * stride_cs + i, mask=row_ok, other=0.0)[None, :]
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        rotate = (heads < N_HEADS + N_KV_HEADS)[:, None]
        # Rounded back to the activation dtype before any cache-dtype cast, as the
        # unfused graph does.
        x1 = tl.where(rotate, x1f * c - x2f * s, x1f).to(x1.dtype)
        x2 = tl.where(rotate, x2f * c + x1f * s, x2f).to(x2.dtype)

    is_q = heads < N_HEADS
    qh = tl.where(is_q, heads, 0)
    dst = q_ptr + t * stride_q + qh[:, None] * (2 * HALF) + i[None, :]
    tl.store(dst, x1, mask=is_q[:, None])
    tl.store(dst + HALF, x2, mask=is_q[:, None])

    # int64 block offsets: block * stride crosses 2^31 elements in a large pool.
    block = tl.where(write_ok, slot // BLOCK_SIZE, 0)
    offset = tl.where(write_ok, slot % BLOCK_SIZE, 0)
    is_k = (heads >= N_HEADS) & (heads < N_HEADS + kv_heads_written)
    kh = tl.where(is_k, heads - N_HEADS, 0).to(tl.int64)
    dst = k_cache_ptr + block * stride_kb + kh[:, None] * stride_kh + offset * stride_ks + i[None, :]
    tl.store(dst, x1.to(k_cache_ptr.dtype.element_ty), mask=is_k[:, None])
    tl.store(dst + HALF, x2.to(k_cache_ptr.dtype.element_ty), mask=is_k[:, None])

    is_v = (heads >= N_HEADS + N_KV_HEADS) & (heads < N_HEADS + N_KV_HEADS + kv_heads_written)
    vh = tl.where(is_v, heads - N_HEADS - N_KV_HEADS, 0).to(tl.int64)
    dst = v_cache_ptr + block * stride_vb + vh[:, None] * stride_vh + offset * stride_vs + i[None, :]
    tl.store(dst, x1.to(v_cache_ptr.dtype.element_ty), mask=is_v[:, None])
    tl.store(dst + HALF, x2.to(v_cache_ptr.dtype.element_ty), mask=is_v[:, None])


def _check_rope_args(x: torch.Tensor, w_qkv: Weight, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise UnsupportedModelError(f"rope_qkv: head_dim {head_dim} is not a power of two in [16, 256]")
    T, N = x.shape[0], w_qkv.shape[0]
    if N != (n_heads + 2 * n_kv_heads) * head_dim:
        raise KernelInputError(f"rope_qkv: the QKV weight has {N} output rows, expected "
                               f"(n_heads {n_heads} + 2 * n_kv_heads {n_kv_heads}) * head_dim {head_dim}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping), ("cos", cos), ("sin", sin),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != x.device:
            raise KernelInputError(f"rope_qkv: {name} is on {t.device}, x on {x.device}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (T,) or t.dtype not in (torch.int32, torch.int64):
            raise KernelInputError(f"rope_qkv: {name} must be an int tensor of shape ({T},), "
                                   f"got {t.dtype} {tuple(t.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[1] != n_kv_heads or c.shape[3] != head_dim or c.stride(3) != 1:
            raise KernelInputError(f"rope_qkv: {name} must be [n_blocks, n_kv_heads {n_kv_heads}, block_size, "
                                   f"head_dim {head_dim}] with unit last stride, got {tuple(c.shape)} "
                                   f"strides {c.stride()}")
    bs = k_cache.shape[2]
    if bs < 1 or bs & (bs - 1):
        raise KernelInputError(f"rope_qkv: block_size {bs} is not a power of two")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 2 or tab.shape[1] != head_dim // 2 or tab.stride(1) != 1 or tab.dtype != torch.float32:
            raise KernelInputError(f"rope_qkv: {name} must be a float32 [max_seq, {head_dim // 2}] table "
                                   f"with unit last stride, got {tab.dtype} {tuple(tab.shape)}")
    if v_cache.shape != k_cache.shape:
        raise KernelInputError(f"rope_qkv: v_cache {tuple(v_cache.shape)} and k_cache {tuple(k_cache.shape)} differ")
    if cos.shape[0] != sin.shape[0] or cos.stride(0) != sin.stride(0):
        raise KernelInputError("rope_qkv: cos and sin tables must have the same rows and row stride")


def _rope_config(n_rows: int, head_dim: int) -> tuple[int, int]:
    """(heads per program, warps): a token's q, k and v heads in one program when they
    fit 32 rows (SmolLM3-3B: 24), about 512 elements per warp."""
    block_h = min(triton.next_power_of_2(n_rows), 32)
    return block_h, max(1, min(8, block_h * head_dim // 512))


def rope_qkv_triton(x: torch.Tensor, w_qkv: Weight, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool) -> torch.Tensor:
    _check_rope_args(x, w_qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, n_heads, n_kv_heads, head_dim)
    qkv = _qkv_projection(x, w_qkv)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    positions = positions.contiguous()
    slot_mapping = slot_mapping.contiguous()
    T = qkv.shape[0]
    q = torch.empty((T, n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    n_rows = n_heads + 2 * n_kv_heads
    block_h, num_warps = _rope_config(n_rows, head_dim)
    grid = (T, triton.cdiv(n_rows, block_h))
    n_blocks, _, block_size, _ = k_cache.shape
    _rope_kv_write_kernel[grid](
        qkv, positions, slot_mapping, cos, sin, q, k_cache, v_cache,
        cos.shape[0], n_blocks * block_size, qkv.stride(0), q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos.stride(0),
        N_HEADS=n_heads, N_KV_HEADS=n_kv_heads, HALF=head_dim // 2, BLOCK_SIZE=block_size,
        BLOCK_H=block_h, USE_ROPE=bool(use_rope), num_warps=num_warps)
    return q
