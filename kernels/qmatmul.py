"""y = x @ dequant(W).T for GGUF-quantized weights.

Reference: dequantize the whole matrix to fp32, then matmul in fp32, output in
x's dtype. The Triton kernels are held to this.
"""
from __future__ import annotations

import torch

from smollm3_triton.quant import Weight


def qmatmul_torch(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N], accumulated in fp32."""
    y = x.float() @ w.dequantize(torch.float32).T
    return y.to(x.dtype)
