"""GGUF weights repacked once at load into planes the Triton kernels read.

GGUF interleaves scales and quants inside blocks whose sizes (Q8_0: 34 bytes,
Q6_K: 210, Q5_0: 22) leave most fields 2-byte aligned, so a kernel reading
them directly cannot issue 16-byte loads. `prepare_weight` splits each
weight into up to four planes, every row padded to a multiple of 16 elements:

  q   quants. 4/5/6-bit types: byte i holds the low 4 bits of element 2i (low
      nibble) and of element 2i + 1 (high nibble), in column order. Q8_0: the
      int8 quants (as uint8 bits). F32/F16/BF16: the matrix itself (no copy).
  qh  the bits above the nibble, as int32 words. 5-bit types (Q5_0, Q5_1,
      Q5_K): bit e % 32 of word e // 32 is element e's fifth bit (Q5_0's own
      qh). Q6_K: bits 2 * (e % 16) of word e // 16 are element e's top 2 bits.
  s   integer sub-block scales. Q4_K/Q5_K: the 6-bit scales of the 32-element
      sub-blocks unpacked to one byte each ([K/32] scales, then [K/32] mins).
      Q6_K: the int8 scales of the 16-element sub-blocks.
  f   fp16 block scales. Q8_0/Q4_0/Q5_0: d per 32. Q4_1/Q5_1: [K/32] d then
      [K/32] m. Q4_K/Q5_K: [K/256] d then [K/256] dmin. Q6_K: d per 256.

So one 16-byte load brings 32 consecutive quants, one word load the high bits
of a whole sub-block, and the byte holding elements (2i, 2i + 1) decodes
straight into adjacent columns of a dequantized tile; every plane is indexed
by column alone, the same way for every type (kernels/qmatmul.py). Nothing is
requantized: the planes describe the GGUF values, and `PackedTensor.dequantize`
reproduces `gguf.quants.dequantize` exactly.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError
from ..gguf.constants import BLOCK_SIZES, FLOAT_DTYPES, SUPPORTED_TYPES, GGMLType, row_bytes, type_name
from ..gguf.tensors import QuantTensor, RowStack, SegmentedTensor

_FIVE_BIT = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K)


def _planar(values: torch.Tensor) -> torch.Tensor:
    """[N, C] -> the same values in a fresh [N, C] view whose row stride is a multiple of 16 elements."""
    n, c = values.shape
    buf = torch.zeros(n, -(-c // 16) * 16, dtype=values.dtype, device=values.device)
    buf[:, :c] = values
    return buf[:, :c]


def _f16(field: torch.Tensor) -> torch.Tensor:
    """uint8 [N, B, 2] (one fp16 field per block) -> float16 [N, B]."""
    return field.contiguous().view(torch.float16).squeeze(-1)


def _low_nibbles(v: torch.Tensor) -> torch.Tensor:
    """Element values [N, K] -> q plane [N, K/2]: byte i = v[2i] & 15 | (v[2i + 1] & 15) << 4."""
    v = (v & 15).to(torch.uint8)
    return v[:, 0::2] | (v[:, 1::2] << 4)


def _high_bits(h: torch.Tensor, bits: int) -> torch.Tensor:
    """Bits above the nibble [N, K], `bits` per element -> int32 words, element e at bits * (e % P) of word e // P."""
    n, k = h.shape
    h = h.to(torch.int32).view(n, k * bits // 8, 8 // bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=h.device)
    return (h << shifts).sum(-1).to(torch.uint8).view(torch.int32)


def _nibble_pairs(qs: torch.Tensor) -> torch.Tensor:
    """GGUF bytes [..., L] -> [..., 2, L]: the L low nibbles, then the L high ones."""
    return torch.stack((qs & 15, qs >> 4), dim=-2)


def _k_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed scales [N, B, 12] -> (scales, mins), each [N, B, 8] of 6-bit values."""
    lo, hi, mix = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    sc = torch.cat((lo & 63, (mix & 15) | ((lo >> 6) << 4)), dim=-1)
    mn = torch.cat((hi & 63, (mix >> 4) | ((hi >> 6) << 4)), dim=-1)
    return sc, mn


@dataclass(frozen=True)
class PackedTensor:
    """One weight of one type in planes (see the module docstring); shape is (rows, cols) = (N, K)."""
    qtype: GGMLType
    shape: tuple[int, int]
    q: torch.Tensor
    qh: torch.Tensor | None = None
    s: torch.Tensor | None = None
    f: torch.Tensor | None = None

    @property
    def planes(self) -> tuple[torch.Tensor | None, ...]:
        return (self.q, self.qh, self.s, self.f)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.planes if p is not None)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def rows(self, start: int, stop: int) -> PackedTensor:
        """Rows [start, stop) as views of the same planes."""
        planes = [None if p is None else p[start:stop] for p in self.planes]
        return PackedTensor(self.qtype, (stop - start, self.shape[1]), *planes)

    def to(self, device: torch.device | str) -> PackedTensor:
        planes = [None if p is None else _planar(p.to(device)) for p in self.planes[1:]]
        q = self.q.to(device) if self.qtype in FLOAT_DTYPES else _planar(self.q.to(device))
        return PackedTensor(self.qtype, self.shape, q, *planes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(None, dtype)

    def dequantize_rows(self, rows: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix (or the selected rows) from the planes alone: the torch twin of the kernels' decoding."""
        if self.qtype in FLOAT_DTYPES:
            return (self.q if rows is None else self.q[rows]).to(dtype)
        v = self.int_values(rows).float()
        n, k = v.shape
        mul, bias = self.affine(rows)
        g = k // mul.shape[1]
        return (v.view(n, -1, g) * mul.unsqueeze(-1) + bias.unsqueeze(-1)).view(n, k).to(dtype)

    def int_values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Quantized types: each element's integer quant [N, K] int32, before any offset
        (Q8_0: signed; 4/5/6-bit types: 0 .. 2^bits - 1)."""
        q, qh = (p if rows is None or p is None else p[rows] for p in (self.q, self.qh))
        n, k = q.shape[0], self.shape[1]
        if self.qtype == GGMLType.Q8_0:
            return q.view(torch.int8).to(torch.int32)
        v = torch.stack((q & 15, q >> 4), dim=-1).reshape(n, k).to(torch.int32)
        if qh is not None:
            bits = 1 if self.qtype in _FIVE_BIT else 2
            shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
            h = (qh.view(torch.uint8).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
            v = v | (h.reshape(n, k).to(torch.int32) << 4)
        return v

    def affine(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mul, bias) fp32 [N, K / G] per sub-block of G elements (Q6_K: 16, the others: 32):
        element = int_values * mul + bias. Each is a product of fp16 and small integers,
        exact in fp32; so is bias + int * mul, whose exact value the GGUF value is."""
        s, f = (p if rows is None or p is None else p[rows] for p in (self.s, self.f))
        n, k, t = f.shape[0], self.shape[1], self.qtype
        f = f.float()
        if t == GGMLType.Q8_0:
            return f, torch.zeros_like(f)
        if t in (GGMLType.Q4_0, GGMLType.Q5_0):
            return f, f * -(8 if t == GGMLType.Q4_0 else 16)
        if t in (GGMLType.Q4_1, GGMLType.Q5_1):
            nb = k // 32
            return f[:, :nb], f[:, nb:]
        if t == GGMLType.Q6_K:
            mul = (s.float().view(n, k // 256, 16) * f.unsqueeze(-1)).view(n, k // 16)
            return mul, mul * -32
        nb, ns = k // 256, k // 32       # Q4_K, Q5_K
        d = (f[:, :nb].unsqueeze(-1) * s[:, :ns].float().view(n, nb, 8)).view(n, ns)
        dm = (f[:, nb:].unsqueeze(-1) * s[:, ns:].float().view(n, nb, 8)).view(n, ns)
        return d, -dm


class PackedWeight(RowStack):
    """Row-wise stack of PackedTensors of mixed types (a fused QKV or gate+up of a Q4_K_M file)."""


Packed = PackedTensor | PackedWeight


def _pack_quant(w: QuantTensor) -> PackedTensor:
    t = w.qtype
    n, k = w.shape
    elems, bpb = BLOCK_SIZES[t]
    if k % elems:
        raise UnsupportedModelError(f"{type_name(t)} weight of shape {w.shape}: {k} columns is not a multiple "
                                    f"of the {elems}-element block")
    if w.data.dtype != torch.uint8 or tuple(w.data.shape) != (n, row_bytes(t, k)):
        raise UnsupportedModelError(f"{type_name(t)} weight of shape {w.shape}: expected uint8 data "
                                    f"[{n}, {row_bytes(t, k)}], got {w.data.dtype} {list(w.data.shape)}")
    b = w.data.reshape(n, k // elems, bpb)
    qh = s = None
    if t == GGMLType.Q8_0:
        return PackedTensor(t, w.shape, _planar(b[..., 2:].reshape(n, k)), None, None, _planar(_f16(b[..., 0:2])))
    if t in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1):
        head = {GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q5_0: 6, GGMLType.Q5_1: 8}[t]
        v = _nibble_pairs(b[..., head:head + 16]).reshape(n, k).to(torch.int32)
        f = _f16(b[..., 0:2])
        if t in (GGMLType.Q4_1, GGMLType.Q5_1):
            f = torch.cat((f, _f16(b[..., 2:4])), dim=1)
        if t in _FIVE_BIT:
            at = head - 4
            # qh is a little-endian uint32 whose bit j belongs to element j: the plane's order already.
            qh = b[..., at:at + 4].reshape(n, k // 8).view(torch.int32)
    elif t in (GGMLType.Q4_K, GGMLType.Q5_K):
        qs = b[..., 16:144] if t == GGMLType.Q4_K else b[..., 48:176]
        v = _nibble_pairs(qs.reshape(n, -1, 4, 32)).reshape(n, k).to(torch.int32)
        sc, mn = _k_scales(b[..., 4:16])
        s = torch.cat((sc.reshape(n, -1), mn.reshape(n, -1)), dim=1)
        f = torch.cat((_f16(b[..., 0:2]), _f16(b[..., 2:4])), dim=1)
        if t == GGMLType.Q5_K:
            # Sub-block i of 32 takes its fifth bit from bit i of qh[l].
            shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1)
            qh = _high_bits(((b[..., 16:48].unsqueeze(2) >> shifts) & 1).reshape(n, k), 1)
    elif t == GGMLType.Q6_K:
        # Element 128h + 64i + 32j + l: nibble i of ql[64h + 32j + l], bits 2(2i+j) of qh[32h + l].
        low = _nibble_pairs(b[..., 0:128].reshape(n, -1, 2, 2, 32)).transpose(-3, -2).reshape(n, k).to(torch.int32)
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).view(1, 1, 1, 4, 1)
        top = ((b[..., 128:192].reshape(n, -1, 2, 1, 32) >> shifts) & 3).reshape(n, k).to(torch.int32)
        v = low | (top << 4)
        qh = _high_bits(top, 2)
        s = b[..., 192:208].reshape(n, -1).view(torch.int8)
        f = _f16(b[..., 208:210])
    else:
        raise UnsupportedModelError(f"no Triton kernel for weights of type {type_name(t)}")
    return PackedTensor(t, w.shape, _planar(_low_nibbles(v)), None if qh is None else _planar(qh),
                        None if s is None else _planar(s), _planar(f))


def _pack(w: QuantTensor) -> PackedTensor:
    if w.qtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"no Triton kernel for weights of type {type_name(w.qtype)}")
    if w.is_float:
        want = FLOAT_DTYPES[w.qtype]
        if w.data.dtype != want or tuple(w.data.shape) != tuple(w.shape):
            raise UnsupportedModelError(f"{type_name(w.qtype)} weight of shape {w.shape}: expected {want} data "
                                        f"{list(w.shape)}, got {w.data.dtype} {list(w.data.shape)}")
        # The kernels need unit stride along K only; rows may be any stride.
        return PackedTensor(w.qtype, w.shape, w.data if w.data.stride(1) == 1 else w.data.contiguous())
    return _pack_quant(w)


def prepare_weight(w: QuantTensor | SegmentedTensor | Packed) -> Packed:
    """Repack a weight for qmatmul_triton / gate_up_swiglu_triton. Call once per weight at load.

    Runs on the weight's device (vectorised torch). Float weights are kept as
    they are (no copy); an already packed weight is returned unchanged.
    """
    if isinstance(w, (PackedTensor, PackedWeight)):
        return w
    if isinstance(w, QuantTensor):
        return _pack(w)
    if isinstance(w, SegmentedTensor):
        return PackedWeight(tuple(_pack(p) for p in w.parts))
    raise TypeError(f"expected a QuantTensor, SegmentedTensor or packed weight, got {type(w).__name__}")


# Packed planes of weights given to the kernels unprepared, kept while the weight lives, so
# a caller that skips prepare_weight still repacks once rather than on every forward.
_cache: dict[int, Packed] = {}


def packed(w: QuantTensor | SegmentedTensor | Packed) -> Packed:
    """prepare_weight, remembered per weight object."""
    if isinstance(w, (PackedTensor, PackedWeight)):
        return w
    hit = _cache.get(id(w))
    if hit is None:
        hit = _cache[id(w)] = prepare_weight(w)
        weakref.finalize(w, _cache.pop, id(w), None)
    return hit
