"""RMSNorm, optionally fused with the residual add that precedes it.

    h = x + residual            (when residual is given)
    y = h / sqrt(mean(h^2) + eps) * weight
Returns (y, h): h is the new residual stream.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), h


# One program per row keeps the whole row in registers: hidden sizes of the SmolLM
# family are 576..2048, far below this bound.
_MAX_ROW = 65536


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, N, eps,
                     stride_x, stride_r, stride_y, stride_h,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
        # The residual stream is kept in its storage dtype; normalising the rounded
        # sum (not the fp32 one) is what the unfused graph does.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
        hf = h.to(tl.float32)
    else:
        hf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (hf * inv_rms * w).to(y_ptr.dtype.element_ty), mask=ok)


def _rms_norm_warps(block_n: int) -> int:
    return max(1, min(16, block_n // 256))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    if weight.shape != (N,):
        raise KernelInputError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({N},) to match x's last dim")
    if residual is not None and residual.shape != x.shape:
        raise KernelInputError(f"rms_norm: residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    if N > _MAX_ROW:
        raise KernelInputError(f"rms_norm: rows of {N} elements exceed the kernel's limit of {_MAX_ROW}")
    weight = weight.contiguous()
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    if residual is None:
        r2, h2, h = x2, x2, x
    else:
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h2 = torch.empty((rows, N), dtype=torch.result_type(x, residual), device=x.device)
        h = h2.view(x.shape)
    if rows:
        block_n = triton.next_power_of_2(N)
        _rms_norm_kernel[(rows,)](x2, r2, weight, y, h2, N, eps,
                                  x2.stride(0), r2.stride(0), y.stride(0), h2.stride(0),
                                  HAS_RESIDUAL=residual is not None, BLOCK_N=block_n,
                                  num_warps=_rms_norm_warps(block_n))
    return y.view(x.shape), h
