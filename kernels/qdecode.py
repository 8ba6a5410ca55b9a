"""Triton decoders of the tile layout (kernels/qtiles.py): 16-column chunks of a weight tile
as exact small integers in a tensor-core dtype, and each chunk's fp32 (mul, bias).

On a GPU the quants become bf16 without int->float conversions: a nibble OR-ed into the
mantissa of 128.0 (bf16 0x4300, 7 mantissa bits) is the bf16 128 + q, and one
fma.rn.bf16x2 (exact on these integers) removes 128 and the type's offset, two weights
per instruction. One 32-bit register holds two words = 8 nibbles of 4 chunks, so four
LOP3s (plus shifts) give the four chunks' bf16x2 registers directly. Under the CPU
interpreter (no inline asm) the same integers come from plain integer ops.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Whether @triton.jit below builds interpreted kernels (it decides when it decorates).
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))

# GGMLType codes, as the kernels' QTYPE constexprs.
F32 = tl.constexpr(0)
F16 = tl.constexpr(1)
Q4_0 = tl.constexpr(2)
Q4_1 = tl.constexpr(3)
Q5_0 = tl.constexpr(6)
Q5_1 = tl.constexpr(7)
Q8_0 = tl.constexpr(8)
Q4_K = tl.constexpr(12)
Q5_K = tl.constexpr(13)
Q6_K = tl.constexpr(14)
BF16 = tl.constexpr(30)


def _bf16x2(value: float) -> str:
    """The bf16x2 immediate holding `value` twice (value must be exact in bf16)."""
    import struct
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    assert bits & 0xFFFF == 0, value
    return f"0x{bits >> 16:04X}{bits >> 16:04X}"


def _nibble_asm(offset: int, high_bits: int) -> str:
    """u16 pair -> 4 bf16x2: chunk t = nibble t (+ high bits from $5) - offset."""
    lines = ["{", ".reg .b32 t, n, v, hs, one, off;", f"mov.b32 one, {_bf16x2(1.0)};",
             f"mov.b32 off, {_bf16x2(-(128.0 + offset))};"]
    if high_bits:
        # $5 = (h0 | h1 << 8): spread to h0 at bits 0-7, h1 at bits 16-23.
        lines.append("prmt.b32 hs, $5, 0, 0x4140;")
    for t in range(4):
        src = "$4" if t == 0 else "t"
        if t:
            lines.append(f"shr.b32 t, $4, {4 * t};")
        lines.append(f"lop3.b32 n, {src}, 0x000F000F, 0x43004300, 0xea;")
        if high_bits:
            width = high_bits
            shift = 4 - width * t
            mask = ((1 << width) - 1) << 4
            op = f"shl.b32 v, hs, {shift};" if shift >= 0 else f"shr.b32 v, hs, {-shift};"
            lines += [op, f"lop3.b32 n, v, 0x{mask:04X}{mask:04X}, n, 0xea;"]
        lines.append(f"fma.rn.bf16x2 ${t}, n, one, off;")
    return "\n".join(lines + ["}"])


def _q8_asm() -> str:
    """u16 pair (bytes: chunk 2j, chunk 2j + 1) -> 2 bf16x2 of the int8 values, exactly.

    q = 16 * hs + lo with hs the signed high nibble: lv = 128 + lo, hv = 128 + (hi ^ 8),
    a = 16 * hv - 2304 = 16 * hs - 128 (exact: a multiple of 16 in [-256, -16]),
    q = lv + a (exact: in [-128, 127])."""
    lines = ["{", ".reg .b32 t, x, lv, hv, a, one, sixteen, bias;", f"mov.b32 one, {_bf16x2(1.0)};",
             f"mov.b32 sixteen, {_bf16x2(16.0)};", f"mov.b32 bias, {_bf16x2(-2304.0)};"]
    for b in range(2):
        src = "$2" if b == 0 else "t"
        if b:
            lines.append("shr.b32 t, $2, 8;")
        lines += [f"lop3.b32 lv, {src}, 0x000F000F, 0x43004300, 0xea;",
                  f"xor.b32 x, {src}, 0x00800080;", "shr.b32 x, x, 4;",
                  "lop3.b32 hv, x, 0x000F000F, 0x43004300, 0xea;",
                  "fma.rn.bf16x2 a, hv, sixteen, bias;",
                  f"fma.rn.bf16x2 ${b}, lv, one, a;"]
    return "\n".join(lines + ["}"])


ASM_Q4 = tl.constexpr(_nibble_asm(0, 0))
ASM_Q4_0 = tl.constexpr(_nibble_asm(8, 0))
ASM_Q5 = tl.constexpr(_nibble_asm(0, 1))
ASM_Q5_0 = tl.constexpr(_nibble_asm(16, 1))
ASM_Q6 = tl.constexpr(_nibble_asm(32, 2))
ASM_Q8 = tl.constexpr(_q8_asm())


@triton.jit
def _nibble_chunks(words, high, QTYPE: tl.constexpr):
    """[R, 16] uint16 words (+ uint8 high bits) -> 4 [R, 16]: chunk t's ints (bf16; fp32 interpreted)."""
    if INTERPRETED:
        w = words.to(tl.int32)
        if QTYPE == Q6_K:
            h = high.to(tl.int32)
            c0 = (w & 15) | ((h & 3) << 4)
            c1 = ((w >> 4) & 15) | (((h >> 2) & 3) << 4)
            c2 = ((w >> 8) & 15) | (((h >> 4) & 3) << 4)
            c3 = ((w >> 12) & 15) | (((h >> 6) & 3) << 4)
        elif (QTYPE == Q5_0) or (QTYPE == Q5_1) or (QTYPE == Q5_K):
            h = high.to(tl.int32)
            c0 = (w & 15) | ((h & 1) << 4)
            c1 = ((w >> 4) & 15) | (((h >> 1) & 1) << 4)
            c2 = ((w >> 8) & 15) | (((h >> 2) & 1) << 4)
            c3 = ((w >> 12) & 15) | (((h >> 3) & 1) << 4)
        else:
            c0 = w & 15
            c1 = (w >> 4) & 15
            c2 = (w >> 8) & 15
            c3 = (w >> 12) & 15
        if QTYPE == Q4_0:
            off: tl.constexpr = 8
        elif QTYPE == Q5_0:
            off: tl.constexpr = 16
        elif QTYPE == Q6_K:
            off: tl.constexpr = 32
        else:
            off: tl.constexpr = 0
        # fp32, not bf16: the interpreter's int -> bf16 cast is not a conversion.
        out = ((c0 - off).to(tl.float32), (c1 - off).to(tl.float32), (c2 - off).to(tl.float32),
               (c3 - off).to(tl.float32))
    else:
        # (two u16 words per 32-bit register: pack=2; four bf16x2 out)
        if QTYPE == Q6_K:
            out = tl.inline_asm_elementwise(ASM_Q6, "=r,=r,=r,=r,r,r", [words, high],
                                            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), True, 2)
        elif QTYPE == Q5_0:
            out = tl.inline_asm_elementwise(ASM_Q5_0, "=r,=r,=r,=r,r,r", [words, high],
                                            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), True, 2)
        elif (QTYPE == Q5_1) or (QTYPE == Q5_K):
            out = tl.inline_asm_elementwise(ASM_Q5, "=r,=r,=r,=r,r,r", [words, high],
                                            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), True, 2)
        elif QTYPE == Q4_0:
            out = tl.inline_asm_elementwise(ASM_Q4_0, "=r,=r,=r,=r,r", [words],
                                            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), True, 2)
        else:
            out = tl.inline_asm_elementwise(ASM_Q4, "=r,=r,=r,=r,r", [words],
                                            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), True, 2)
    return out


@triton.jit
def _byte_chunks(words):
    """[R, 16] uint16 words of two int8 -> 2 [R, 16]: the low bytes' ints, the high bytes' (bf16; fp32
    interpreted)."""
    if INTERPRETED:
        w = words.to(tl.int32)
        lo = w & 255
        hi = (w >> 8) & 255
        out = ((lo - ((lo & 128) << 1)).to(tl.float32), (hi - ((hi & 128) << 1)).to(tl.float32))
    else:
        out = tl.inline_asm_elementwise(ASM_Q8, "=r,=r,r", [words], (tl.bfloat16, tl.bfloat16), True, 2)
    return out


@triton.jit
def chunks(qw_ptr, qh_ptr, stride_qw, stride_qh, n, n_ok, g, K, QTYPE: tl.constexpr, DTYPE: tl.constexpr):
    """The 4 chunks of group g of rows n: ([R, 16] x 4 in DTYPE, exact integers for
    quantized types, the weights themselves for float types; zero where not n_ok)."""
    e = tl.arange(0, 16)
    rows = n.to(tl.int64)[:, None]
    ok = n_ok[:, None]
    if (QTYPE == F32) or (QTYPE == F16) or (QTYPE == BF16):
        base = qw_ptr + rows * stride_qw + 64 * g + e[None, :]
        c0 = tl.load(base, mask=ok & (64 * g + e < K)[None, :], other=0.0).to(DTYPE)
        c1 = tl.load(base + 16, mask=ok & (64 * g + 16 + e < K)[None, :], other=0.0).to(DTYPE)
        c2 = tl.load(base + 32, mask=ok & (64 * g + 32 + e < K)[None, :], other=0.0).to(DTYPE)
        c3 = tl.load(base + 48, mask=ok & (64 * g + 48 + e < K)[None, :], other=0.0).to(DTYPE)
    elif QTYPE == Q8_0:
        base = qw_ptr + rows * stride_qw + 32 * g + e[None, :]
        c0, c1 = _byte_chunks(tl.load(base, mask=ok, other=0))
        c2, c3 = _byte_chunks(tl.load(base + 16, mask=ok, other=0))
        c0, c1, c2, c3 = c0.to(DTYPE), c1.to(DTYPE), c2.to(DTYPE), c3.to(DTYPE)
    else:
        words = tl.load(qw_ptr + rows * stride_qw + 16 * g + e[None, :], mask=ok, other=0)
        if (QTYPE == Q4_0) or (QTYPE == Q4_1) or (QTYPE == Q4_K):
            high = words
        else:
            high = tl.load(qh_ptr + rows * stride_qh + 16 * g + e[None, :], mask=ok, other=0)
        c0, c1, c2, c3 = _nibble_chunks(words, high, QTYPE)
        c0, c1, c2, c3 = c0.to(DTYPE), c1.to(DTYPE), c2.to(DTYPE), c3.to(DTYPE)
    return c0, c1, c2, c3


@triton.jit
def _half(word, upper: tl.constexpr):
    """fp16 half of an int32 word, as fp32."""
    if upper:
        bits = (word >> 16) & 0xFFFF
    else:
        bits = word & 0xFFFF
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def scales(sc_ptr, sm_ptr, sd_ptr, stride_sc, stride_sm, stride_sd, n, n_ok, g, QTYPE: tl.constexpr):
    """Group g's per-chunk multipliers and sub-block biases of rows n (fp32 [R] each):
    (mul0, mul1, mul2, mul3, bias_a, bias_b); chunks 0, 1 form sub-block A and 2, 3 B
    (Q6_K: four sub-blocks, no bias). Zero where not n_ok."""
    rows = n.to(tl.int64)
    w = tl.load(sc_ptr + rows * stride_sc + g, mask=n_ok, other=0)
    if (QTYPE == Q4_K) or (QTYPE == Q5_K):
        dd = tl.load(sd_ptr + rows * stride_sd + g // 4, mask=n_ok, other=0)
        d = _half(dd, False)
        dmin = _half(dd, True)
        mul_a = d * (w & 255).to(tl.float32)
        mul_b = d * ((w >> 8) & 255).to(tl.float32)
        out = (mul_a, mul_a, mul_b, mul_b, -dmin * ((w >> 16) & 255).to(tl.float32),
               -dmin * ((w >> 24) & 255).to(tl.float32))
    elif QTYPE == Q6_K:
        d = _half(tl.load(sd_ptr + rows * stride_sd + g // 4, mask=n_ok, other=0), False)
        s0 = ((w << 24) >> 24).to(tl.float32)
        s1 = ((w << 16) >> 24).to(tl.float32)
        s2 = ((w << 8) >> 24).to(tl.float32)
        s3 = (w >> 24).to(tl.float32)
        zero = tl.zeros_like(d)
        out = (d * s0, d * s1, d * s2, d * s3, zero, zero)
    else:
        d_a = _half(w, False)
        d_b = _half(w, True)
        if (QTYPE == Q4_1) or (QTYPE == Q5_1):
            m = tl.load(sm_ptr + rows * stride_sm + g, mask=n_ok, other=0)
            out = (d_a, d_a, d_b, d_b, _half(m, False), _half(m, True))
        else:
            zero = tl.zeros_like(d_a)
            out = (d_a, d_a, d_b, d_b, zero, zero)
    return out


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """v.to(dtype) with the GPU's round-to-nearest-even, also under the CPU interpreter, whose
    float32 -> bfloat16 cast truncates."""
    if INTERPRETED and (dtype == tl.bfloat16) and (v.dtype == tl.float32):
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def x_chunk(x_ptr, stride_xm, m, m_ok, k0, K, DTYPE: tl.constexpr):
    """x[m, k0 : k0 + 16] as the dot's right operand [16, rows m] in DTYPE (0 outside)."""
    k = k0 + tl.arange(0, 16)
    x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                other=0.0)
    return tl.trans(x.to(DTYPE))


@triton.jit
def dot(a, b, acc):
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def tile_products(accs, xs, qw_ptr, qh_ptr, sc_ptr, sm_ptr, sd_ptr, s_qw, s_qh, s_sc, s_sm, s_sd,
                  n, n_ok, g0, K, QTYPE: tl.constexpr, GROUPS: tl.constexpr, BATCH: tl.constexpr,
                  DTYPE: tl.constexpr):
    """accs + W[rows n, groups g0 .. g0 + GROUPS - 1] @ x.T: fp32 [rows n, 8] tiles, one per 8-row
    batch tile b < BATCH of x (xs[b * GROUPS + i]: the 4 chunks of group i for batch tile b, from
    x_chunk), each group's products added in group order. Each group's weights are decoded
    once for all batch tiles; each 8-row tile takes the same instructions in the same order,
    so a row's result does not depend on BATCH or on the other rows. Both matmul kernels
    compute every K-slice with this, a slice's groups in one call or in consecutive calls
    (the same additions in the same order)."""
    IS_FLOAT: tl.constexpr = (QTYPE == F32) or (QTYPE == F16) or (QTYPE == BF16)
    HAS_BIAS: tl.constexpr = (QTYPE == Q4_K) or (QTYPE == Q5_K) or (QTYPE == Q4_1) or (QTYPE == Q5_1)
    for i in tl.static_range(GROUPS):
        g = g0 + i
        c0, c1, c2, c3 = chunks(qw_ptr, qh_ptr, s_qw, s_qh, n, n_ok, g, K, QTYPE, DTYPE)
        if not IS_FLOAT:
            mul0, mul1, mul2, mul3, bias_a, bias_b = scales(sc_ptr, sm_ptr, sd_ptr, s_sc, s_sm, s_sd, n, n_ok, g,
                                                            QTYPE)
        if HAS_BIAS:
            if BATCH == 1:
                # The sum-of-x dots do not depend on the tile: computed once per program.
                ones = tl.full(c0.shape, 1.0, c0.dtype)
            else:
                # Ones on the tile's real rows: tied to the tile, the sum-of-x dots are redone
                # per tile rather than hoisted out of the row loop and held (BATCH x 2 x GROUPS
                # accumulators would spill).
                ones = tl.broadcast_to(n_ok[:, None], c0.shape).to(c0.dtype)
        updated = ()
        for b in tl.static_range(BATCH):
            x0, x1, x2, x3 = xs[b * GROUPS + i]
            acc = accs[b]
            if IS_FLOAT:
                acc = dot(c3, x3, dot(c2, x2, dot(c1, x1, dot(c0, x0, acc))))
            elif QTYPE == Q6_K:
                # Each sub-block's dot product times its multiplier, accumulated as FMAs.
                acc += dot(c0, x0, None) * mul0[:, None]
                acc += dot(c1, x1, None) * mul1[:, None]
                acc += dot(c2, x2, None) * mul2[:, None]
                acc += dot(c3, x3, None) * mul3[:, None]
            else:
                acc += dot(c1, x1, dot(c0, x0, None)) * mul0[:, None]
                acc += dot(c3, x3, dot(c2, x2, None)) * mul2[:, None]
                if HAS_BIAS:
                    # Each sub-block's sum of x, as a dot with ones: it lands in the
                    # accumulator's layout (a broadcast of a reduction would be converted
                    # through shared memory every group).
                    acc += dot(ones, x1, dot(ones, x0, None)) * bias_a[:, None]
                    acc += dot(ones, x3, dot(ones, x2, None)) * bias_b[:, None]
            updated = updated + (acc,)
        accs = updated
    return accs
