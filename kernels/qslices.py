"""K-slice products of the tile layout and their fp32 partials: the pieces both matmul kernels
(kernels/qmatmul.py) build on, so that they compute a row's sums with the same instructions
in the same order.

A slice is GROUPS groups of 64 columns of W; its product with x for one 64-row weight tile is
`products` over those groups (tile_products, kernels/qdecode.py), x loaded for all of them at
once or, `streamed`, SUB groups at a time: the same additions in the same order either way.
Partials are fp32 [slice, weight row, row of x].
"""
from __future__ import annotations

import triton
import triton.language as tl

from .fusions import SWIGLU, x_chunk
from .qdecode import tile_products


@triton.jit
def x_slice(x_ptr, stride_xm, M, K, row0, g0, NORM: tl.constexpr, norm, GROUPS: tl.constexpr,
            BATCH: tl.constexpr, DTYPE: tl.constexpr):
    """x rows row0 .. row0 + 8 * BATCH - 1, columns of groups g0 .. g0 + GROUPS - 1, as
    tile_products takes them."""
    xs = ()
    for b in tl.static_range(BATCH):
        m = row0 + b * 8 + tl.arange(0, 8)
        for i in tl.static_range(GROUPS):
            k0 = (g0 + i) * 64
            xs = xs + ((x_chunk(x_ptr, stride_xm, m, m < M, k0, K, NORM, norm, DTYPE),
                        x_chunk(x_ptr, stride_xm, m, m < M, k0 + 16, K, NORM, norm, DTYPE),
                        x_chunk(x_ptr, stride_xm, m, m < M, k0 + 32, K, NORM, norm, DTYPE),
                        x_chunk(x_ptr, stride_xm, m, m < M, k0 + 48, K, NORM, norm, DTYPE)),)
    return xs


@triton.jit
def zero_tiles(BATCH: tl.constexpr):
    accs = ()
    for b in tl.static_range(BATCH):
        accs = accs + (tl.zeros([64, 8], tl.float32),)
    return accs


@triton.jit
def tile_rows(part, t):
    """Output rows of tile t of a part and which of them exist."""
    n = t * 64 + tl.arange(0, 64)
    return n, n < part[10]


@triton.jit
def products(accs, xs, part, t, g0, K, QTYPE: tl.constexpr, GROUPS: tl.constexpr, BATCH: tl.constexpr,
             DTYPE: tl.constexpr):
    """accs + tile t of a part (planes tuple: 5 pointers, 5 row strides, rows) times x over groups
    g0 .. g0 + GROUPS - 1."""
    qw, qh, sc, sm, sd, s_qw, s_qh, s_sc, s_sm, s_sd, rows = part
    n, ok = tile_rows(part, t)
    return tile_products(accs, xs, qw, qh, sc, sm, sd, s_qw, s_qh, s_sc, s_sm, s_sd, n, ok, g0, K, QTYPE, GROUPS,
                         BATCH, DTYPE)


@triton.jit
def streamed(accs, x_args, part, t, g_begin, g_end, QTYPE: tl.constexpr, SUB: tl.constexpr,
             BATCH: tl.constexpr, DTYPE: tl.constexpr, NORM: tl.constexpr):
    """accs + tile t of a part times x over groups g_begin .. g_end - 1, SUB groups of x loaded at
    a time: the same additions in the same order as one call over the whole range."""
    x_ptr, stride_xm, M, K, row0, norm = x_args
    for g in range(g_begin, g_end, SUB):
        xs = x_slice(x_ptr, stride_xm, M, K, row0, g, NORM, norm, SUB, BATCH, DTYPE)
        accs = products(accs, xs, part, t, g, K, QTYPE, SUB, BATCH, DTYPE)
    return accs


@triton.jit
def store_part(part_ptr, accs, s, col, ok, N_TOTAL, row0, M, BATCH: tl.constexpr):
    """part[s, col, m] = accs for rows m = row0 + 8b + j < M (rows of x fastest, as the MMA's registers
    hold them; only real rows, so one row of x is 4 bytes per column)."""
    for b in tl.static_range(BATCH):
        m = row0 + b * 8 + tl.arange(0, 8)
        dst = part_ptr + (s * N_TOTAL + col.to(tl.int64))[:, None] * M + m[None, :]
        tl.store(dst, accs[b], mask=ok[:, None] & (m < M)[None, :])


@triton.jit
def sum_parts(part_ptr, col, ok, m, M, N_TOTAL, S):
    """sum over slices s = 0 .. S-1, in that order, of part[s, col, m] -> fp32 [cols, rows m]."""
    acc = tl.zeros([col.shape[0], m.shape[0]], tl.float32)
    for s in range(0, S):
        src = part_ptr + (s * N_TOTAL + col.to(tl.int64))[:, None] * M + m[None, :]
        acc += tl.load(src, mask=ok[:, None] & (m < M)[None, :], other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def streamed_unit(u, s, x_args, A, B, part_ptr, N_A, N_TOTAL, tiles_a, g_begin, g_end, QTYPE_A: tl.constexpr,
                  QTYPE_B: tl.constexpr, EPILOGUE: tl.constexpr, UNIT_TILES: tl.constexpr, SUB: tl.constexpr,
                  BATCH: tl.constexpr, DTYPE: tl.constexpr, NORM: tl.constexpr):
    """Slice s of unit u's tiles over groups g_begin .. g_end - 1 -> partials, each chunk of x
    loaded once for all of them (SWIGLU: gate and up tile u)."""
    if EPILOGUE == SWIGLU:
        x_ptr, stride_xm, M, K, row0, norm = x_args
        n, ok = tile_rows(A, u)
        gate = zero_tiles(BATCH)
        up = zero_tiles(BATCH)
        for g in range(g_begin, g_end, SUB):
            xs = x_slice(x_ptr, stride_xm, M, K, row0, g, NORM, norm, SUB, BATCH, DTYPE)
            gate = products(gate, xs, A, u, g, K, QTYPE_A, SUB, BATCH, DTYPE)
            up = products(up, xs, B, u, g, K, QTYPE_B, SUB, BATCH, DTYPE)
        store_part(part_ptr, gate, s, n, ok, N_TOTAL, 0, M, BATCH)
        store_part(part_ptr, up, s, N_A + n, ok, N_TOTAL, 0, M, BATCH)
    else:
        t0 = u * UNIT_TILES
        if t0 < tiles_a:       # a unit's tiles lie in one part (kernels/qmatmul.py two_parts)
            _streamed_tiles(x_args, A, t0, 0, s, part_ptr, N_TOTAL, g_begin, g_end, QTYPE_A, UNIT_TILES, SUB,
                            BATCH, DTYPE, NORM)
        elif QTYPE_B is not None:
            _streamed_tiles(x_args, B, t0 - tiles_a, N_A, s, part_ptr, N_TOTAL, g_begin, g_end, QTYPE_B, UNIT_TILES,
                            SUB, BATCH, DTYPE, NORM)


@triton.jit
def _streamed_tiles(x_args, part, t0, col0, s, part_ptr, N_TOTAL, g_begin, g_end, QTYPE: tl.constexpr,
                    TILES: tl.constexpr, SUB: tl.constexpr, BATCH: tl.constexpr, DTYPE: tl.constexpr,
                    NORM: tl.constexpr):
    """Slice s of tiles t0 .. t0 + TILES - 1 of a part (output rows from col0) -> partials, each
    chunk of x loaded once for all the tiles; each tile's additions are `streamed`'s."""
    x_ptr, stride_xm, M, K, row0, norm = x_args
    accs = ()
    for j in tl.static_range(TILES):
        accs = accs + (zero_tiles(BATCH),)
    for g in range(g_begin, g_end, SUB):
        xs = x_slice(x_ptr, stride_xm, M, K, row0, g, NORM, norm, SUB, BATCH, DTYPE)
        updated = ()
        for j in tl.static_range(TILES):
            updated = updated + (products(accs[j], xs, part, t0 + j, g, K, QTYPE, SUB, BATCH, DTYPE),)
        accs = updated
    for j in tl.static_range(TILES):
        n, ok = tile_rows(part, t0 + j)
        store_part(part_ptr, accs[j], s, col0 + n, ok, N_TOTAL, 0, M, BATCH)
