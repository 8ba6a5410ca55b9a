"""Token embedding: rows of the (quantized) embedding matrix, and their RMSNorm statistic.

    h[t] = dequant(E)[token_ids[t]]            in the activation dtype
    inv_rms[t] = 1 / sqrt(mean(h[t]^2) + eps)   of the rounded row (fp32), for the first RMSNorm

Reference: `embedding_torch` (the weight's own dequantize_rows, then the formula of
kernels/rms_norm.py). Triton path: one launch, a program per 8 tokens decoding their rows
from the tile layout (kernels/qtiles.py) group by group (weights = int * mul + bias in fp32,
exact, then rounded once), where the unfused path took ~15 torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from . import gpu
from .pdl import launch_options, release_next, wait_for_inputs
from .qdecode import BF16, F16, F32, chunks, round_to, scales
from .qtiles import TiledTensor, tiled

TOKENS = 8             # tokens per program


def embedding_torch(token_ids: torch.Tensor, embed, dtype: torch.dtype, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    h = embed.dequantize_rows(token_ids, dtype)
    hf = h.float()
    return h, torch.rsqrt(hf.pow(2).mean(-1) + eps)


@triton.jit
def _embedding_kernel(ids_ptr, T, h_ptr, stride_h, inv_ptr, eps, planes, K,
                      QTYPE: tl.constexpr, TOKENS: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    release_next(PDL)
    qw, qh, sc, sm, sd, s_qw, s_qh, s_sc, s_sm, s_sd = planes
    IS_FLOAT: tl.constexpr = (QTYPE == F32) or (QTYPE == F16) or (QTYPE == BF16)
    t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    t_ok = t < T
    row = tl.load(ids_ptr + t, mask=t_ok, other=0)
    e = tl.arange(0, 16)
    dst = h_ptr + t.to(tl.int64)[:, None] * stride_h
    squares = tl.zeros([TOKENS], tl.float32)
    for g in range(0, tl.cdiv(K, 64)):
        c0, c1, c2, c3 = chunks(qw, qh, s_qw, s_qh, row, t_ok, g, K, QTYPE, tl.float32)
        if IS_FLOAT:
            v0, v1, v2, v3 = c0, c1, c2, c3
        else:
            mul0, mul1, mul2, mul3, bias_a, bias_b = scales(sc, sm, sd, s_sc, s_sm, s_sd, row, t_ok, g, QTYPE)
            v0 = c0 * mul0[:, None] + bias_a[:, None]
            v1 = c1 * mul1[:, None] + bias_a[:, None]
            v2 = c2 * mul2[:, None] + bias_b[:, None]
            v3 = c3 * mul3[:, None] + bias_b[:, None]
        for j in tl.static_range(4):
            k = 64 * g + 16 * j + e
            ok = t_ok[:, None] & (k < K)[None, :]
            if j == 0:
                v = round_to(v0, h_ptr.dtype.element_ty)
            elif j == 1:
                v = round_to(v1, h_ptr.dtype.element_ty)
            elif j == 2:
                v = round_to(v2, h_ptr.dtype.element_ty)
            else:
                v = round_to(v3, h_ptr.dtype.element_ty)
            tl.store(dst + k[None, :], v, mask=ok)
            vf = tl.where(ok, v.to(tl.float32), 0.0)
            squares += tl.sum(vf * vf, axis=1)
    tl.store(inv_ptr + t, 1.0 / tl.sqrt(squares / K + eps), mask=t_ok)


def embedding_triton(token_ids: torch.Tensor, embed, dtype: torch.dtype, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """embedding_torch's contract in one launch; `embed` a TiledTensor (prepare_tiles at load)."""
    embed = tiled(embed)
    if not isinstance(embed, TiledTensor):
        raise KernelInputError("embedding: the embedding matrix must be of one type (a TiledTensor)")
    if token_ids.dim() != 1 or token_ids.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"embedding: token_ids must be a 1-D int tensor, got {token_ids.dtype} "
                               f"{tuple(token_ids.shape)}")
    T = token_ids.shape[0]
    K = embed.shape[1]
    h = torch.empty((T, K), dtype=dtype, device=token_ids.device)
    inv = torch.empty(T, dtype=torch.float32, device=token_ids.device)
    if T:
        planes = [embed.qw if p is None else p for p in embed.planes]
        strides = [0 if p is None else p.stride(0) for p in embed.planes]
        _embedding_kernel[(triton.cdiv(T, TOKENS),)](token_ids.contiguous(), T, h, h.stride(0), inv, float(eps),
                                                    (*planes, *strides), K, QTYPE=int(embed.qtype), TOKENS=TOKENS,
                                                    num_warps=1, **launch_options(token_ids.device), **gpu.FP_FUSION)
    return h, inv


