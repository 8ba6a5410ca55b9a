"""RMSNorm, optionally fused with the residual add that precedes it.

    h = x + residual            (when residual is given)
    y = h / sqrt(mean(h^2) + eps) * weight
`rms_norm_torch` returns (y, h): h is the new residual stream.

On the Triton path RMSNorm is not a launch of its own (kernels/fusions.py): the matmul that
updates the residual stream also writes each row's inv_rms = 1 / sqrt(mean(h^2) + eps), and
the next matmul applies y = round(h * inv_rms * weight) while loading its input. Here is
the one place inv_rms is computed alone: `rms_stats_triton`, for a step whose rows were
replaced after the embedding (image rows of a vision prompt).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from . import gpu


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), h


def rms_stats_torch(h: torch.Tensor, eps: float) -> torch.Tensor:
    """inv_rms [rows] fp32 of h [rows, N]."""
    hf = h.float()
    return torch.rsqrt(hf.pow(2).mean(-1) + eps)


# One program per row keeps the whole row in registers: hidden sizes of the SmolLM
# family are 576..2048, far below this bound.
_MAX_ROW = 65536


@triton.jit
def _rms_stats_kernel(h_ptr, inv_ptr, N, eps, stride_h, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    h = tl.load(h_ptr + row * stride_h + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(inv_ptr + row, 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps))


def rms_stats_triton(h: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_stats_torch's contract: the inv_rms the fused matmuls take (kernels/fusions.py)."""
    if h.dim() != 2 or h.stride(1) != 1:
        raise KernelInputError(f"rms_stats: h must be [rows, N] with unit column stride, got {tuple(h.shape)} "
                               f"strides {h.stride()}")
    rows, N = h.shape
    if N > _MAX_ROW:
        raise KernelInputError(f"rms_stats: rows of {N} elements exceed the kernel's limit of {_MAX_ROW}")
    inv = torch.empty(rows, dtype=torch.float32, device=h.device)
    if rows:
        block_n = triton.next_power_of_2(N)
        _rms_stats_kernel[(rows,)](h, inv, N, eps, h.stride(0), BLOCK_N=block_n,
                                   num_warps=max(1, min(16, block_n // 256)), **gpu.FP_FUSION)
    return inv
