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

Triton path (`rope_qkv_triton`): one launch of the matmul kernels (kernels/qmatmul.py) whose
epilogue (kernels/fusions.py ROPE_KV) takes each head's fp32 sums, rounds them to x's dtype,
rotates q and k and writes q out and k, v into the cache: qkv never reaches memory.
"""
from __future__ import annotations

import torch

from ..errors import KernelInputError, UnsupportedModelError
from ..gguf.tensors import Weight
from .fusions import ROPE_KV
from .qmatmul import BLOCK_N, launch, qmatmul_torch, two_parts
from .qmatmul import prepared as _prepared_matmul


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


def rope_qkv_triton(x: torch.Tensor, w_qkv: Weight, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool, *,
                    norm: tuple | None = None) -> torch.Tensor:
    """rope_qkv_torch's contract in one matmul launch: the QKV projection's epilogue rotates q and k
    and writes q out and k, v into the cache (kernels/fusions.py). With norm = (inv_rms, weight),
    x is first RMSNorm(x)."""
    _check_rope_args(x, w_qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, n_heads, n_kv_heads, head_dim)
    # A unit (what one program finishes) is whole heads: RoPE pairs element i with i + head_dim / 2.
    unit_tiles = max(1, head_dim // BLOCK_N)
    x, w, groups = _prepared_matmul(x, w_qkv, "rope_qkv", unit_tiles * BLOCK_N)
    T = x.shape[0]
    q = torch.empty((T, n_heads, head_dim), dtype=x.dtype, device=x.device)
    if T == 0:
        return q
    n_blocks, _, block_size, _ = k_cache.shape
    rope = (positions.contiguous(), slot_mapping.contiguous(), cos, sin, cos.stride(0), cos.shape[0],
            n_blocks * block_size, q, q.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    consts = dict(N_HEADS=n_heads, N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                  USE_ROPE=bool(use_rope))
    for row, a, b in two_parts(w, unit_tiles):
        launch(x, a, b, groups, ROPE_KV, (rope, row), norm=norm, unit_tiles=unit_tiles, consts=consts)
    return q
