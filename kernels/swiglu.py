"""SwiGLU on a fused gate+up projection: silu(x @ Wg.T) * (x @ Wu.T).

The fused weight stacks gate rows then up rows ([2 * I, K]).
"""
from __future__ import annotations

import torch

from smollm3_triton.quant import Weight

from .qmatmul import qmatmul_torch


def gate_up_swiglu_torch(x: torch.Tensor, w_gate_up: Weight) -> torch.Tensor:
    """x [M, K] -> [M, I]; the activation is computed in fp32."""
    gu = qmatmul_torch(x.float(), w_gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
