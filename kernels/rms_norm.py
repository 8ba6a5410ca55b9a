"""RMSNorm, optionally fused with the residual add that precedes it.

    h = x + residual            (when residual is given)
    y = h / sqrt(mean(h^2) + eps) * weight
Returns (y, h): h is the new residual stream.
"""
from __future__ import annotations

import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), h
