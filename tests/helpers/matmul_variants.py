"""The matmul / embedding launches the dispatch picks, recorded on uninitialised weight tiles.

`launches(full)` runs the real launchers (kernels/qmatmul.py, swiglu.py, rope_qkv.py,
embedding.py) under tests/helpers/decode_trace.py's tracer, on weights laid out exactly as
kernels/qtiles.py lays them out but never filled (torch.empty: no memory is touched), so
every constexpr and every specialisation (16-divisible strides and sizes, counts of 1) is
the one a real model gets. Distinct launches by compiled variant are what
tests/test_compile_qmatmul.py compiles.

- SmolLM3-3B Q4_K_M, every role a decode layer has (fused QKV of Q4_K + Q6_K with the RoPE / KV
  epilogue, o and down with the residual epilogue, gate+up with SwiGLU, the LM head in fp32,
  the embedding), at M = 1, 64 (decode) and 128 (prefill), bf16 activations;
- every other GGUF type on the plain decode and prefill paths;
- full=True adds M = 16 and 32, fp32 and fp16 activations, and SmolLM2-135M's Q5_0 / Q8_0 QKV
  (head_dim 64).
"""
from __future__ import annotations

import torch

from smollm3_triton.gguf.constants import FLOAT_DTYPES, GGMLType

_FIVE_OR_SIX = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q6_K)


def _plane(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, cols] with the row stride rounded to 16 bytes, as qtiles pads it."""
    per16 = max(1, 16 // dtype.itemsize)
    return torch.empty(rows, -(-cols // per16) * per16, dtype=dtype)[:, :cols]


def empty_tiles(qtype: GGMLType, rows: int, cols: int):
    from smollm3_triton.kernels.qtiles import TiledTensor
    if qtype in FLOAT_DTYPES:
        return TiledTensor(qtype, (rows, cols), torch.empty(rows, cols, dtype=FLOAT_DTYPES[qtype]))
    groups = -(-cols // 64)
    qw = _plane(rows, groups * (32 if qtype == GGMLType.Q8_0 else 16), torch.uint16)
    qh = _plane(rows, groups * 16, torch.uint8) if qtype in _FIVE_OR_SIX else None
    sc = _plane(rows, groups, torch.int32)
    sm = _plane(rows, groups, torch.int32) if qtype in (GGMLType.Q4_1, GGMLType.Q5_1) else None
    sd = _plane(rows, cols // 256, torch.int32) if qtype in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K) else None
    return TiledTensor(qtype, (rows, cols), qw, qh, sc, sm, sd)


def _layer_calls(x_rows: int, dtype: torch.dtype, hidden: int, inter: int, heads: tuple, types: dict, vocab: int):
    """Calls of one decode layer's matmuls, the LM head and the embedding on empty tiles."""
    from smollm3_triton.kernels.embedding import embedding_triton
    from smollm3_triton.kernels.qmatmul import add_qmatmul_triton, qmatmul_triton
    from smollm3_triton.kernels.qtiles import TiledWeight
    from smollm3_triton.kernels.rope_qkv import rope_qkv_triton
    from smollm3_triton.kernels.swiglu import gate_up_swiglu_triton

    n_heads, n_kv, hd = heads
    qk = (n_heads + n_kv) * hd
    qkv = TiledWeight((empty_tiles(types["qk"], qk, hidden), empty_tiles(types["v"], n_kv * hd, hidden)))
    o = empty_tiles(types["o"], hidden, n_heads * hd)
    gate_up = empty_tiles(types["gate_up"], 2 * inter, hidden)
    down = empty_tiles(types["down"], hidden, inter)
    head = empty_tiles(types["head"], vocab, hidden)
    h = torch.empty(x_rows, hidden, dtype=dtype)
    stats = torch.empty(x_rows, dtype=torch.float32)
    norm = (stats, torch.empty(hidden, dtype=torch.float32))
    cache = torch.empty(8, n_kv, 16, hd, dtype=dtype)
    rows = torch.zeros(x_rows, dtype=torch.int64)
    table = torch.empty(4096, hd // 2, dtype=torch.float32)
    return [
        lambda: rope_qkv_triton(h, qkv, rows, table, table, cache, cache, rows, n_heads, n_kv, hd, True, norm=norm),
        lambda: add_qmatmul_triton(torch.empty(x_rows, n_heads * hd, dtype=dtype), o, h, 1e-6),
        lambda: gate_up_swiglu_triton(h, gate_up, norm=norm),
        lambda: add_qmatmul_triton(torch.empty(x_rows, inter, dtype=dtype), down, h, 1e-6),
        lambda: qmatmul_triton(h, head, out_dtype=torch.float32, norm=norm),
        lambda: embedding_triton(rows, head, dtype, 1e-6),
    ]


SMOLLM3_Q4_K_M = dict(qk=GGMLType.Q4_K, v=GGMLType.Q6_K, o=GGMLType.Q4_K, gate_up=GGMLType.Q4_K,
                      down=GGMLType.Q6_K, head=GGMLType.Q6_K)
SMOLLM2_135M_Q4_K_M = dict(qk=GGMLType.Q5_0, v=GGMLType.Q8_0, o=GGMLType.Q5_0, gate_up=GGMLType.Q5_0,
                           down=GGMLType.Q8_0, head=GGMLType.Q8_0)


def launches(full: bool) -> list:
    """(label, launch) of every distinct compiled variant the selection covers."""
    from tests.helpers import decode_trace, kernel_compile

    calls = []
    for m in ((1, 16, 32, 64, 128) if full else (1, 64, 128)):
        dtypes = (torch.bfloat16, torch.float32, torch.float16) if full else (torch.bfloat16,)
        for dtype in dtypes:
            if dtype != torch.bfloat16 and m not in (1, 128):
                continue
            for label, f in zip(("qkv", "o", "gate_up", "down", "lm_head", "embedding"),
                                _layer_calls(m, dtype, 2048, 11008, (16, 4, 128), SMOLLM3_Q4_K_M, 128256)):
                calls.append((f"SmolLM3 {label} M={m} {str(dtype)[6:]}", f))
    if full:
        for label, f in zip(("qkv", "o", "gate_up", "down", "lm_head", "embedding"),
                            _layer_calls(1, torch.bfloat16, 576, 1536, (9, 3, 64), SMOLLM2_135M_Q4_K_M, 49152)):
            calls.append((f"SmolLM2-135M {label} M=1 bf16", f))
    from smollm3_triton.kernels.qmatmul import qmatmul_triton
    for qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q8_0,
                  GGMLType.F16, GGMLType.BF16, GGMLType.F32):
        w = empty_tiles(qtype, 2048, 2048)
        for m in (1, 128):
            x = torch.empty(m, 2048, dtype=torch.bfloat16)
            calls.append((f"{qtype.name} M={m} bf16", lambda x=x, w=w: qmatmul_triton(x, w)))
    seen, out = set(), []
    for label, f in calls:
        for launch in decode_trace.trace(f).launches:
            sig, consts, _ = kernel_compile.specialize(launch.fn, launch.args)
            key = (launch.name, repr(sorted(sig.items())), repr(sorted(consts.items(), key=str)), launch.num_warps,
                   launch.num_stages)
            if key not in seen:
                seen.add(key)
                out.append((label, launch))
    return out
