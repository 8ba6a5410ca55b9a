"""Random GGUF weights for the qmatmul / swiglu kernel tests, and their independent oracle.

Blocks are random bytes, so every quant value, high bit and sub-block scale
pattern occurs; only the fp16 block scales (d, dmin, m) are set to finite
values of either sign in [2^-10, 2^-6], keeping sums of thousands of products
in a range where float32 error is meaningful. The oracle matrix comes from
gguf-py's numpy dequantization (not from this project's code), in float64.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from smollm3_triton.gguf.constants import BLOCK_SIZES, FLOAT_DTYPES, GGMLType
from smollm3_triton.gguf.tensors import QuantTensor

QUANT_TYPES = [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
               GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K]
FLOAT_TYPES = [GGMLType.F16, GGMLType.BF16, GGMLType.F32]
ALL_TYPES = QUANT_TYPES + FLOAT_TYPES

# Byte offsets of the fp16 scale fields in one block (ggml-common.h).
_FP16_FIELDS = {
    GGMLType.Q8_0: [0], GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
    GGMLType.Q4_K: [0, 2], GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208],
}


def random_weight(qtype: GGMLType, rows: int, cols: int, seed: int = 0) -> QuantTensor:
    """A CPU QuantTensor of `qtype`, shape (rows, cols)."""
    rng = np.random.default_rng(seed)
    if qtype in FLOAT_DTYPES:
        data = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 0.05)
        return QuantTensor(data.to(FLOAT_DTYPES[qtype]), qtype, (rows, cols))
    elems, nbytes = BLOCK_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // elems, nbytes), dtype=np.uint8)
    for off in _FP16_FIELDS[qtype]:
        mag = 2.0 ** rng.uniform(-10, -6, size=blocks.shape[:2])
        val = (mag * rng.choice([-1.0, 1.0], size=mag.shape)).astype(np.float16)
        blocks[..., off:off + 2] = val.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return QuantTensor(torch.from_numpy(blocks.reshape(rows, -1)), qtype, (rows, cols))


def oracle_matrix(w: QuantTensor) -> torch.Tensor:
    """float64 [rows, cols]: gguf-py's dequantization of the raw blocks (floats as stored)."""
    if w.qtype in FLOAT_DTYPES:
        return w.data.cpu().double()
    values = gguf_dequantize(w.data.cpu().numpy(), GGMLQuantizationType(int(w.qtype)))
    return torch.from_numpy(np.ascontiguousarray(values)).double()
