"""GGUF blocks -> float32, in plain vectorised torch (runs wherever `data` lives).

Block layouts follow ggml-common.h; the arithmetic follows gguf-py's
`gguf.quants` (numpy) and llama.cpp's dequantize_row_*, in their order. The
results are bit-identical to gguf-py (tests/test_dequant.py) and, by the
following argument, to llama.cpp, whatever order either uses:
scales are fp16 (11 significant bits) and every product of scales and quants
needs at most 23 bits (Q6_K: d * int8 scale * 6-bit quant), so it is exact in
float32, and the one rounding is the offset subtraction/addition (Q4_1, Q5_1,
Q4_K, Q5_K). Any association of the products, or an FMA, gives the same bits.

All multi-byte fields are little-endian, as GGUF stores them and as every host
torch runs on reads them.
"""
from __future__ import annotations

import torch

from ..errors import GGUFError, UnsupportedModelError
from .constants import BLOCK_SIZES, FLOAT_DTYPES, SUPPORTED_TYPES, GGMLType, type_name


def _reinterpret(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., k * size] -> dtype [..., k], the same bytes read as `dtype`."""
    try:
        return b.view(dtype)
    except RuntimeError:
        # A dtype view needs a unit-stride last dim and a storage offset and
        # strides divisible by the new element size; a field inside an
        # odd-sized block (Q5_0's qh sits at byte 2 of 22) or a slice starting
        # at an odd byte has neither, and a compact copy always does.
        return b.clone(memory_format=torch.contiguous_format).view(dtype)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """A 2-byte fp16 field of each block, [N, 2] -> float32 [N, 1]."""
    return _reinterpret(b, torch.float16).float()


def _shifts(step: int, like: torch.Tensor) -> torch.Tensor:
    """Bit offsets 0, step, ... < 8 on `like`'s device (arange: no host-to-device copy)."""
    return torch.arange(0, 8, step, dtype=torch.uint8, device=like.device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, C, L] bytes -> [N, 2C, L]: each run of L bytes yields L low nibbles, then L high ones."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(qs.shape[0], -1, qs.shape[-1])


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[N, 4] bytes of a little-endian uint32 -> its 32 bits [N, 32], bit i at index i."""
    return ((qh.unsqueeze(-1) >> _shifts(1, qh)) & 1).reshape(qh.shape[0], 32)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins, each [N, 8].

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales
    and mins 4-7 take their low 4 bits from bytes 8-11 (scale: low nibble, min:
    high nibble) and their top 2 bits from the top 2 bits of bytes 0-3 (scale)
    or 4-7 (min).
    """
    s = s.reshape(s.shape[0], 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)), dim=1)
    mn = torch.cat((b & 0x3F, (c >> 4) | ((b >> 6) << 4)), dim=1)
    return sc, mn


# Each function maps uint8 blocks [N, block_bytes] to float32 [N, block_elems].

def _q8_0(blk: torch.Tensor) -> torch.Tensor:
    # d: fp16 | qs: 32 x int8.  x = qs * d
    d = _f16(blk[:, 0:2])
    return blk[:, 2:].view(torch.int8).float() * d


def _q4_0(blk: torch.Tensor) -> torch.Tensor:
    # d: fp16 | qs: 16 bytes, element j in the low nibble of qs[j], j+16 in its high nibble.
    # x = (q - 8) * d
    d = _f16(blk[:, 0:2])
    q = _nibbles(blk[:, 2:].unsqueeze(1)).reshape(blk.shape[0], 32)
    return d * (q.float() - 8)


def _q4_1(blk: torch.Tensor) -> torch.Tensor:
    # d: fp16 | m: fp16 | qs as Q4_0.  x = (d * q) + m
    d, m = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    q = _nibbles(blk[:, 4:].unsqueeze(1)).reshape(blk.shape[0], 32)
    return d * q.float() + m


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # Low 4 bits as Q4_0; bit j of the uint32 qh is the 5th bit of element j.
    lo = _nibbles(qs.unsqueeze(1)).reshape(qs.shape[0], 32)
    return (lo | (_bits32(qh) << 4)).float()


def _q5_0(blk: torch.Tensor) -> torch.Tensor:
    # d: fp16 | qh: uint32 | qs: 16 bytes.  x = (q - 16) * d
    d = _f16(blk[:, 0:2])
    return d * (_q5(blk[:, 2:6], blk[:, 6:]) - 16)


def _q5_1(blk: torch.Tensor) -> torch.Tensor:
    # d: fp16 | m: fp16 | qh: uint32 | qs: 16 bytes.  x = (d * q) + m
    d, m = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    return d * _q5(blk[:, 4:8], blk[:, 8:]) + m


def _q4_k(blk: torch.Tensor) -> torch.Tensor:
    # d: fp16 | dmin: fp16 | scales: 12 bytes (_k_scales) | qs: 128 bytes.
    # 8 sub-blocks of 32; bytes 32c..32c+31 carry sub-block 2c in their low
    # nibbles and 2c+1 in their high ones.  x = (d*sc) * q - (dmin*m)
    n = blk.shape[0]
    d, dmin = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    sc, mn = _k_scales(blk[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * mn.float()).unsqueeze(-1)
    q = _nibbles(blk[:, 16:].reshape(n, 4, 32)).float()
    return (dl * q - ml).reshape(n, 256)


def _q5_k(blk: torch.Tensor) -> torch.Tensor:
    # d: fp16 | dmin: fp16 | scales: 12 bytes | qh: 32 bytes | qs: 128 bytes.
    # Low 4 bits as Q4_K; bit s of qh[l] is the 5th bit of element l of
    # sub-block s.  x = (d*sc) * q - (dmin*m)
    n = blk.shape[0]
    d, dmin = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    sc, mn = _k_scales(blk[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * mn.float()).unsqueeze(-1)
    lo = _nibbles(blk[:, 48:].reshape(n, 4, 32))
    hi = (blk[:, 16:48].unsqueeze(1) >> _shifts(1, blk).view(1, 8, 1)) & 1
    q = (lo | (hi << 4)).float()
    return (dl * q - ml).reshape(n, 256)


def _q6_k(blk: torch.Tensor) -> torch.Tensor:
    # ql: 128 bytes | qh: 64 bytes | scales: 16 x int8 | d: fp16.
    # Two halves of 128 elements, each as 4 groups of 32: group g, element l
    # takes its low 4 bits from ql[64h + 32(g%2) + l] (low nibble for g < 2,
    # high for g >= 2) and its top 2 bits from bits 2g..2g+1 of qh[32h + l].
    # 16 sub-blocks of 16 share a scale.  x = (d*scale) * (q - 32)
    n = blk.shape[0]
    lo = _nibbles(blk[:, 0:128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)
    hi = (blk[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(2, blk).view(1, 1, 4, 1)) & 3
    q = ((lo | (hi << 4)).float() - 32).reshape(n, 16, 16)
    scales = blk[:, 192:208].view(torch.int8).float()
    d = _f16(blk[:, 208:210])
    dl = (d * scales).unsqueeze(-1)
    return (dl * q).reshape(n, 256)


_DEQUANT = {
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}

def dequantize(data: torch.Tensor, qtype: GGMLType | int) -> torch.Tensor:
    """Raw GGUF bytes uint8 [..., n_bytes] (whole blocks) -> float32 [..., n_elements].

    `data` may be on any device, non-contiguous, or backed by read-only memory
    (a memmapped file): it is only read.
    """
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(type_name(t) for t in SUPPORTED_TYPES))
        raise UnsupportedModelError(f"GGUF tensor type {type_name(qtype)} is not supported (supported: {supported})")
    qtype = GGMLType(qtype)
    if data.dtype != torch.uint8 or data.dim() == 0:
        raise GGUFError(
            f"{qtype.name} data must be raw bytes, a uint8 tensor [..., n_bytes]; got {data.dtype} of shape {tuple(data.shape)}")
    elems, nbytes = BLOCK_SIZES[qtype]
    if data.shape[-1] % nbytes:
        raise GGUFError(
            f"{qtype.name} rows of {data.shape[-1]} bytes are not whole blocks of {nbytes} bytes")
    if qtype in FLOAT_DTYPES:
        # Always a copy: an F32 view would alias (possibly read-only, memmapped) input.
        return _reinterpret(data, FLOAT_DTYPES[qtype]).to(torch.float32, copy=True)
    out_shape = (*data.shape[:-1], data.shape[-1] // nbytes * elems)
    n_blocks = data.numel() // nbytes
    if n_blocks == 0:  # the block functions' reshapes cannot infer a dim of an empty tensor
        return torch.empty(out_shape, dtype=torch.float32, device=data.device)
    return _DEQUANT[qtype](data.reshape(n_blocks, nbytes)).reshape(out_shape)
