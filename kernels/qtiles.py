"""GGUF weights repacked once at load into the tile layout of the Triton matmuls.

Columns go in groups of 64; chunk t (0..3) of group g is columns 64g + 16t .. 64g + 16t + 15,
the K extent of one tensor-core dot. Every plane is indexed [row, ...] and padded so each
row starts on 16 bytes; quantized types pad K to a multiple of 64 with zeros.

  qw  4/5/6-bit types: uint16 [N, K/4]; word 16g + e holds in nibble t (bits 4t..4t+3)
      the low 4 bits of element 64g + 16t + e. One 32-bit register = 2 words = 8
      weights of 4 different chunks: a few LOP3s turn it into 4 bf16x2 registers, each
      already a pair of neighbours of one chunk (no shuffles: `_chunks`).
      Q8_0: uint16 [N, K/2]; word 32g + 16j + e holds in byte b the int8 of element
      64g + 32j + 16b + e (chunk 2j + b).
      F16 / BF16 / F32: the matrix itself (no copy, no padding).
  qh  bits above the nibble, uint8 [N, K/4], byte 16g + e: Q6_K bits 2t, 2t+1 = bits 4, 5
      of element 64g + 16t + e; Q5_0 / Q5_1 / Q5_K bit t = its fifth bit.
  sc  one int32 per row and group: Q4_K / Q5_K the 6-bit (scale A, scale B, min A, min B)
      of its two 32-element sub-blocks (A = chunks 0, 1; B = chunks 2, 3); Q6_K the four
      int8 scales of chunks 0..3; Q8_0 / Q4_0 / Q5_0 / Q4_1 / Q5_1 fp16 (d_A, d_B).
  sm  Q4_1 / Q5_1: fp16 (m_A, m_B) per group.
  sd  Q4_K / Q5_K: fp16 (d, dmin) per 256 columns; Q6_K: fp16 (d, 0).

Element = int * mul + bias per chunk, with int = the quant less the type's offset (Q4_0 8,
Q5_0 16, Q6_K 32; Q8_0 signed): exact small integers, which bf16 and fp16 hold exactly,
so a kernel feeds them to the tensor cores as they are and applies mul / bias (fp32,
exact: products of fp16 and small integers) to each chunk's dot product. Nothing is
requantized: `TiledTensor.dequantize` reproduces gguf-py's values (tests).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError
from ..gguf.constants import FLOAT_DTYPES, SUPPORTED_TYPES, GGMLType, type_name
from ..gguf.tensors import QuantTensor, RowStack, SegmentedTensor
from .repack import PackedTensor, prepare_weight

GROUP = 64
CHUNK = 16
_FOUR_BIT = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)
_FIVE_BIT = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K)
OFFSET = {GGMLType.Q4_0: 8, GGMLType.Q5_0: 16, GGMLType.Q6_K: 32}


def _rows16(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> a view of the same values whose row stride is a multiple of 16 bytes."""
    n, c = t.shape
    per16 = 16 // t.element_size()
    buf = torch.zeros(n, -(-c // per16) * per16, dtype=t.dtype, device=t.device)
    buf[:, :c] = t
    return buf[:, :c]


def _pairs_to_words(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """uint8 tensors of one shape [..., C] -> uint16 [..., C], lo in the low byte."""
    return torch.stack((lo, hi), dim=-1).contiguous().view(torch.uint16).squeeze(-1)


def _bytes_to_int32(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, G, 4] -> int32 [N, G] (byte 0 lowest)."""
    return b.contiguous().view(torch.int32).squeeze(-1)


def _f16_words(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float16 [N, C] twice -> int32 [N, C], a in the low half."""
    return torch.stack((a, b), dim=-1).view(torch.int32).squeeze(-1)


def _f16_pairs(values: torch.Tensor, groups: int) -> torch.Tensor:
    """float16 [N, 2 * G'] (per 32-element block) -> int32 [N, groups]: (block 2g, block 2g + 1)."""
    n = values.shape[0]
    v = torch.zeros(n, 2 * groups, dtype=torch.float16, device=values.device)
    v[:, :values.shape[1]] = values
    return v.view(torch.int32)


@dataclass(frozen=True)
class TiledTensor:
    """One weight of one type in the tile layout (module docstring); shape is (N, K)."""
    qtype: GGMLType
    shape: tuple[int, int]
    qw: torch.Tensor
    qh: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    sm: torch.Tensor | None = None
    sd: torch.Tensor | None = None

    @property
    def planes(self) -> tuple[torch.Tensor | None, ...]:
        return (self.qw, self.qh, self.sc, self.sm, self.sd)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.planes if p is not None)

    @property
    def device(self) -> torch.device:
        return self.qw.device

    def rows(self, start: int, stop: int) -> TiledTensor:
        planes = [None if p is None else p[start:stop] for p in self.planes]
        return TiledTensor(self.qtype, (stop - start, self.shape[1]), *planes)

    def to(self, device) -> TiledTensor:
        if self.qtype in FLOAT_DTYPES:
            return TiledTensor(self.qtype, self.shape, self.qw.to(device))
        planes = [None if p is None else _rows16(p.to(device)) for p in self.planes]
        return TiledTensor(self.qtype, self.shape, *planes)

    # ----------------------------------------------------------------- torch decoding (references, lookups)
    def int_values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Quantized types: each element's int (quant less the type's offset) [n, K], int32."""
        qw, qh = (None if p is None else (p if rows is None else p[rows]) for p in (self.qw, self.qh))
        n, k = qw.shape[0], self.shape[1]
        g = -(-k // GROUP)
        if self.qtype == GGMLType.Q8_0:
            b = qw.contiguous().view(torch.uint8).view(n, g, 2, CHUNK, 2)          # [n, g, j, e, b]
            v = b.transpose(-1, -2).reshape(n, g * GROUP).view(torch.int8).to(torch.int32)
            return v[:, :k]
        w = qw.to(torch.int32).view(n, g, 1, CHUNK)
        t = torch.arange(4, device=qw.device).view(1, 1, 4, 1)
        v = (w >> (4 * t)) & 15                                                      # [n, g, t, e]
        if qh is not None:
            h = qh.to(torch.int32).view(n, g, 1, CHUNK)
            v = v | ((((h >> (2 * t)) & 3) if self.qtype == GGMLType.Q6_K else ((h >> t) & 1)) << 4)
        return (v.reshape(n, g * GROUP) - OFFSET.get(self.qtype, 0))[:, :k]

    def affine(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mul, bias) fp32 [n, G * 4], one per chunk of 16: element = int * mul + bias."""
        sc, sm, sd = (None if p is None else (p if rows is None else p[rows]) for p in (self.sc, self.sm, self.sd))
        n, g = sc.shape
        t = self.qtype

        def per_chunk(pair: torch.Tensor) -> torch.Tensor:      # [n, g, 2] per sub-block -> [n, 4g]
            return pair.repeat_interleave(2, dim=-1).reshape(n, 4 * g)

        if t in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
            dd = sd.contiguous().view(torch.float16).float().view(n, -1, 2)          # [n, K/256, (d, dmin)]
            per_group = dd.repeat_interleave(4, dim=1)[:, :g]                        # [n, g, 2]
            b = sc.contiguous().view(torch.uint8).view(n, g, 4)
            if t == GGMLType.Q6_K:
                mul = b.view(torch.int8).float() * per_group[..., :1]
                return mul.reshape(n, 4 * g), torch.zeros(n, 4 * g, device=sc.device)
            mul = per_chunk(b[..., 0:2].float() * per_group[..., :1])
            bias = per_chunk(-(b[..., 2:4].float() * per_group[..., 1:2]))
            return mul, bias
        d = per_chunk(sc.contiguous().view(torch.float16).float().view(n, g, 2))
        m = per_chunk(sm.contiguous().view(torch.float16).float().view(n, g, 2)) if sm is not None else None
        return d, (m if m is not None else torch.zeros_like(d))

    def dequantize_rows(self, rows: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.qtype in FLOAT_DTYPES:
            return (self.qw if rows is None else self.qw[rows]).to(dtype)
        v = self.int_values(rows).float()
        n, k = v.shape
        mul, bias = self.affine(rows)
        kp = mul.shape[1] * CHUNK
        v = torch.nn.functional.pad(v, (0, kp - k)).view(n, -1, CHUNK)
        return (v * mul.unsqueeze(-1) + bias.unsqueeze(-1)).view(n, kp)[:, :k].to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(None, dtype)


class TiledWeight(RowStack):
    """Row-wise stack of TiledTensors of mixed types (a fused QKV or gate+up of a Q4_K_M file)."""


Tiled = TiledTensor | TiledWeight


def _tile(p: PackedTensor) -> TiledTensor:
    t = p.qtype
    n, k = p.shape
    if t in FLOAT_DTYPES:
        return TiledTensor(t, p.shape, p.q)
    g = -(-k // GROUP)
    v = torch.nn.functional.pad(p.int_values(), (0, g * GROUP - k)).view(n, g, 4, CHUNK)   # [n, g, t, e]
    qh = sm = sd = None
    if t == GGMLType.Q8_0:
        b = v.to(torch.int8).view(torch.uint8).view(n, g, 2, 2, CHUNK)            # [n, g, j, b, e]
        qw = _pairs_to_words(b[:, :, :, 0], b[:, :, :, 1]).reshape(n, g * 2 * CHUNK)
    else:
        nib = (v & 15).to(torch.uint8)
        qw = _pairs_to_words(nib[:, :, 0] | (nib[:, :, 1] << 4), nib[:, :, 2] | (nib[:, :, 3] << 4)).reshape(n, -1)
        if t == GGMLType.Q6_K:
            hb = (v >> 4).to(torch.uint8)
            qh = (hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)).reshape(n, -1)
        elif t in _FIVE_BIT:
            hb = (v >> 4).to(torch.uint8)
            qh = (hb[:, :, 0] | (hb[:, :, 1] << 1) | (hb[:, :, 2] << 2) | (hb[:, :, 3] << 3)).reshape(n, -1)
    if t in (GGMLType.Q4_K, GGMLType.Q5_K):
        s = p.s.contiguous().view(n, 2, k // 32)                                                  # scales, mins per 32
        b = torch.stack((s[:, 0, 0::2], s[:, 0, 1::2], s[:, 1, 0::2], s[:, 1, 1::2]), dim=-1)
        sc = _bytes_to_int32(b.to(torch.uint8))
        f = p.f.contiguous().view(n, 2, k // 256)
        sd = _f16_words(f[:, 0], f[:, 1])
    elif t == GGMLType.Q6_K:
        sc = _bytes_to_int32(p.s.contiguous().view(torch.uint8).view(n, g, 4))
        sd = _f16_words(p.f, torch.zeros_like(p.f))
    else:
        blocks = -(-k // 32)
        sc = _f16_pairs(p.f[:, :blocks], g)
        if t in (GGMLType.Q4_1, GGMLType.Q5_1):
            sm = _f16_pairs(p.f[:, blocks:2 * blocks], g)
    planes = [None if x is None else _rows16(x) for x in (qw, qh, sc, sm, sd)]
    return TiledTensor(t, p.shape, *planes)


def prepare_tiles(w: QuantTensor | SegmentedTensor | Tiled) -> Tiled:
    """Repack a weight into the tile layout, once at load (vectorised torch, on its device)."""
    if isinstance(w, (TiledTensor, TiledWeight)):
        return w
    if isinstance(w, QuantTensor):
        if w.qtype not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"no Triton kernel for weights of type {type_name(w.qtype)}")
        return _tile(prepare_weight(w))
    if isinstance(w, SegmentedTensor):
        return TiledWeight(tuple(prepare_tiles(p) for p in w.parts))
    raise TypeError(f"expected a QuantTensor, SegmentedTensor or tiled weight, got {type(w).__name__}")


def segments(w: Tiled) -> list[tuple[int, TiledTensor]]:
    """(first output row, part) of each part of a weight."""
    parts = w.parts if isinstance(w, TiledWeight) else (w,)
    out, row = [], 0
    for p in parts:
        out.append((row, p))
        row += p.shape[0]
    return out


# Tiles of weights given to the kernels unprepared, kept while the weight lives, so a caller
# that skips prepare_tiles still repacks once rather than on every call.
_cache: dict[int, Tiled] = {}


def tiled(w: QuantTensor | SegmentedTensor | Tiled) -> Tiled:
    """prepare_tiles, remembered per weight object."""
    if isinstance(w, (TiledTensor, TiledWeight)):
        return w
    hit = _cache.get(id(w))
    if hit is None:
        hit = _cache[id(w)] = prepare_tiles(w)
        weakref.finalize(w, _cache.pop, id(w), None)
    return hit
