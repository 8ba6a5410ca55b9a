"""The fast CPU op set (backend "cpu"): weights stay 4-bit in memory, matmuls run on
torch's CPU int4 weight-only kernel, attention on torch's fused SDPA.

Why: decode on a CPU is bound by the bytes read per token. The exact path (backend
"torch") reads every weight as fp32, 8x the bytes of a Q4 block; here a weight costs
half a byte (plus a bf16 scale and zero per 32 elements).

Weights (`CpuWeight`, built once at load by `prepare_weights`): every 32-element
group of a GGUF weight is `int * mul + bias` (repack's int_values / affine). The
kernel `_weight_int4pack_mm_for_cpu` computes with `(q - 8) * scale + zero`, q in
0..15, one (scale, zero) per group of 32. A 4-bit type (Q4_0, Q4_1, Q4_K) is one
such int4 plane: q = int, scale = mul, zero = bias + 8 * mul. A wider type (Q5_0,
Q5_1, Q5_K, Q8_0) is split as int = lo + 16 * hi into two planes whose products
add up: lo (scale mul, zero bias + 8 * mul) and hi + 8 (scale 16 * mul, zero 0).
Q6_K (16-element sub-blocks, a group size the kernel does not take) is kept as a
dense bf16 matrix; F32/F16/BF16 weights as fp32, computed exactly as the reference.

What is not exact (measured against the exact path in tests/test_cpu_fast.py and on
the real model in bench/cpu_fast_kld.py): the kernel takes bf16 activations, bf16
scales and zeros, and writes bf16; it accumulates in fp32. The residual stream, the
norms, RoPE, the KV cache and attention stay in the model's dtype (fp32 by default).

Batch invariance: the int4 kernel computes each row the same way whatever the row
count (tested), and attention runs each sequence on its own keys, so a token's
result does not depend on the batch it is in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smollm3_triton.quant import FLOAT_DTYPES, GGMLType, QuantTensor, SegmentedTensor
from smollm3_triton.weights import ModelWeights

from . import Ops
from .qmatmul import qmatmul_torch
from .repack import prepare_weight
from .rms_norm import rms_norm_torch
from .rope_qkv import rope_write_torch

GROUP = 32
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
# Query rows per SDPA call of a prompt: bounds the [rows, keys] mask of a long prompt.
QUERY_TILE = 512


@dataclass(frozen=True)
class Int4Plane:
    packed: torch.Tensor         # [N, K / 2] uint8, _convert_weight_to_int4pack_for_cpu's layout
    scales_zeros: torch.Tensor   # [K / 32, N, 2] bfloat16


@dataclass(frozen=True)
class CpuTensor:
    """One weight of one type: int4 planes whose products add up, or a dense matrix."""
    shape: tuple[int, int]
    planes: tuple[Int4Plane, ...] = ()
    dense: torch.Tensor | None = None

    def matmul(self, x_bf16: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (and its bf16 copy) -> [M, N]."""
        if self.dense is None:
            y = _INT4_MM(x_bf16, self.planes[0].packed, GROUP, self.planes[0].scales_zeros)
            for p in self.planes[1:]:
                y = y + _INT4_MM(x_bf16, p.packed, GROUP, p.scales_zeros)
            return y
        if self.dense.dtype == torch.bfloat16:
            return x_bf16 @ self.dense.T
        return qmatmul_torch(x, QuantTensor(self.dense, GGMLType.F32, self.shape))


@dataclass(frozen=True)
class CpuWeight:
    """A model matrix on the fast CPU path: row segments (one per GGUF type of a fused
    weight), and the GGUF tensor itself for embedding-row lookups."""
    segments: tuple[CpuTensor, ...]
    source: QuantTensor | SegmentedTensor

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(s.shape[0] for s in self.segments), self.segments[0].shape[1])

    def dequantize_rows(self, rows: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.source.dequantize_rows(rows, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.source.dequantize(dtype)


def _int4_plane(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Plane:
    """q [N, K] in 0..15; scale, zero [N, K / 32] fp32."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack((scale.T, zero.T), dim=-1).to(torch.bfloat16).contiguous()
    return Int4Plane(packed, sz)


_FOUR_BIT = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)
_SPLIT = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q8_0)


def prepare_tensor(w: QuantTensor) -> CpuTensor:
    if w.qtype in FLOAT_DTYPES:
        return CpuTensor(w.shape, dense=w.dequantize(torch.float32).contiguous())
    p = prepare_weight(w)
    if w.qtype == GGMLType.Q6_K:
        return CpuTensor(w.shape, dense=p.dequantize(torch.bfloat16).contiguous())
    if w.qtype not in _FOUR_BIT + _SPLIT:
        raise ValueError(f"no CPU int4 layout for {w.qtype.name}")
    v, (mul, bias) = p.int_values(), p.affine()
    lo = _int4_plane(v & 15, mul, bias + 8 * mul)
    if w.qtype in _FOUR_BIT:
        return CpuTensor(w.shape, planes=(lo,))
    return CpuTensor(w.shape, planes=(lo, _int4_plane((v >> 4) + 8, 16 * mul, torch.zeros_like(mul))))


def prepare(w: QuantTensor | SegmentedTensor) -> CpuWeight:
    parts = w.parts if isinstance(w, SegmentedTensor) else (w,)
    return CpuWeight(tuple(prepare_tensor(p) for p in parts), w)


def prepare_weights(w: ModelWeights) -> ModelWeights:
    """Every matrix in the int4 layout, once at load. A tied LM head stays one object
    with the embedding, whose lookups read the GGUF blocks."""
    return w.map(prepare, lambda v: v)


# ---------------------------------------------------------------- ops

def qmatmul_cpu(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype."""
    xb = x.to(torch.bfloat16)
    ys = [s.matmul(xb, x) for s in w.segments]
    return (ys[0] if len(ys) == 1 else torch.cat([y.to(x.dtype) for y in ys], dim=1)).to(x.dtype)


def gate_up_swiglu_cpu(x: torch.Tensor, w_gate_up: CpuWeight) -> torch.Tensor:
    gate, up = qmatmul_cpu(x.float(), w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def rope_qkv_cpu(x: torch.Tensor, w_qkv: CpuWeight, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool) -> torch.Tensor:
    return rope_write_torch(qmatmul_cpu(x, w_qkv), positions, cos, sin, k_cache, v_cache, slot_mapping,
                            n_heads, n_kv_heads, head_dim, use_rope)


def _keys(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cache [n_blocks, Hkv, bs, D], tables [B, n] -> [B, Hkv, n * bs, D]: one gather, the
    result a view of it."""
    g = cache.transpose(0, 1)[:, tables]                  # [Hkv, B, n, bs, D], contiguous
    hkv, b, n, bs, d = g.shape
    return g.transpose(0, 1).reshape(b, hkv, n * bs, d)


def attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int,
                  scale: float) -> torch.Tensor:
    """attention_torch's contract on torch's fused SDPA. A KV head's query heads are
    folded into the query rows ([B, Hkv, rows * group, D]), so keys are read once per
    group; every sequence's keys end at its own length (masked beyond)."""
    N, H, D = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    group = H // hkv
    out = torch.zeros_like(q)
    starts, lens = query_start.tolist(), seq_lens.tolist()
    singles = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1 and lens[b] > 0]
    if singles:
        rows = torch.tensor([starts[b] for b in singles])
        n_blocks = -(-max(lens[b] for b in singles) // bs)
        k = _keys(k_cache, block_tables[singles, :n_blocks])
        v = _keys(v_cache, block_tables[singles, :n_blocks])
        visible = torch.arange(n_blocks * bs) < seq_lens[singles, None].to(torch.int64)
        o = F.scaled_dot_product_attention(q[rows].view(len(singles), hkv, group, D).to(k.dtype), k, v,
                                           attn_mask=visible[:, None, None, :], scale=scale)
        out[rows] = o.reshape(len(singles), H, D).to(q.dtype)
    for b in range(len(lens)):
        n_q = starts[b + 1] - starts[b]
        if n_q <= 1 or lens[b] == 0:
            continue
        n_blocks = -(-lens[b] // bs)
        k = _keys(k_cache, block_tables[b:b + 1, :n_blocks])
        v = _keys(v_cache, block_tables[b:b + 1, :n_blocks])
        key_pos = torch.arange(n_blocks * bs)
        for t0 in range(0, n_q, QUERY_TILE):
            r = min(QUERY_TILE, n_q - t0)
            rows = slice(starts[b] + t0, starts[b] + t0 + r)
            tile = q[rows].view(r, hkv, group, D).permute(1, 0, 2, 3).reshape(1, hkv, r * group, D)
            pos = lens[b] - n_q + t0 + torch.arange(r).repeat_interleave(group)
            o = F.scaled_dot_product_attention(tile.to(k.dtype), k, v, attn_mask=key_pos[None, :] <= pos[:, None],
                                               scale=scale)
            out[rows] = o[0].view(hkv, r, group, D).permute(1, 0, 2, 3).reshape(r, H, D).to(q.dtype)
    return out


CPU_OPS = Ops(qmatmul=qmatmul_cpu, gate_up_swiglu=gate_up_swiglu_cpu, rope_qkv=rope_qkv_cpu,
              attention=attention_cpu, rms_norm=rms_norm_torch)
