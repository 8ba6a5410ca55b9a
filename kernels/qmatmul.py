"""y = x @ dequant(W).T for GGUF-quantized weights on the tile layout (kernels/qtiles.py).

Reference: `qmatmul_torch`: dequantize the whole matrix to fp32, matmul in fp32.

One arithmetic for every row, whatever the batch:
- W is cut into K-slices of GROUPS x 64 columns, a fixed count per weight (from its shape
  and the GPU's SM count, never from M): as few as still give every SM two programs at
  M = 1, since each slice costs fp32 partials of every row. A slice's product with x is
  computed by `tile_products` (kernels/qdecode.py): weights as exact bf16 integers in the
  left operand of m16n8k16 tensor-core dots, x in tiles of 8 rows as the right operand,
  each 16-column chunk's fp32 dot product times its scale, added in group order; the
  slices' products are summed in slice order. A row's result is bitwise the same alone, in
  any batch and in a prompt: the same instructions in the same order compute it, and MMA
  outputs do not mix columns.
- Decode (M <= DECODE_ROWS), `_qmv_kernel`: program (slice s, range of row tiles) loads its
  slice of x once (every row of x; a wide slice SUB groups at a time, for one unit of
  one or two tiles),
  decodes each weight tile once for all 8-row tiles of x, and stores fp32 partials; the
  last program to finish a tile (an atomic counter per tile) sums the slices' partials in
  slice order and writes y. One launch, bandwidth-bound by construction: enough programs
  for every SM at M = 1, 16-byte loads of quants, a few LOP3 + one bf16x2 FMA per two
  weights, x read once per program.
- Prefill (M > DECODE_ROWS), `_qmm_kernel`: program (row tile, 16 rows of x; 8 for gate+up)
  walks the slices in order, summing their products in registers: the decode kernel's
  sums, without partials in memory.
- PAIRED (gate+up, kernels/swiglu.py): unit u is gate tile u and up tile u; y = silu(gate) * up.
A weight of two types (a Q4_K_M file's fused QKV) is one launch: each row tile belongs to
one part, which picks its decoding path (both compiled in).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from ..gguf.tensors import Weight
from . import gpu
from .fusions import (
    RESIDUAL,
    ROPE_KV,
    STORE,
    SWIGLU,
    counters,
    residual_rows,
    rms_from_squares,
    rope_kv_rows,
    rope_pairs,
)
from .pdl import launch_options, release_next, wait_for_inputs
from .qdecode import INTERPRETED, round_to
from .qslices import products, store_part, streamed, streamed_unit, sum_parts, tile_rows, x_slice, zero_tiles
from .qtiles import GROUP, Tiled, TiledTensor, segments, tiled

# CPU BLAS runs a few rows through other kernels (other summation orders) than many;
# from MIN_ROWS rows on, each row's result is independent of the row count. Padding
# to it keeps a token's logits bit-identical whatever batch it is computed in.
MIN_ROWS = 16


def qmatmul_torch(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N], accumulated in fp32."""
    M = x.shape[0]
    xf = x.float()
    if M < MIN_ROWS:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, MIN_ROWS - M))
    y = xf @ w.dequantize(torch.float32).T
    return y[:M].to(x.dtype)


DECODE_ROWS = 64       # up to this many rows of x: the split-K decode kernel
BLOCK_N = 64           # weight rows per tile
PREFILL_BATCH = 2      # 8-row tiles of x per prefill program
PAIRED_STREAM_ROWS = 32     # past it, two tiles of 64 rows of x would spill (80 B at 64 rows, sm_90)


@triton.jit
def _finish_unit(u, part_ptr, S, N_A, N_TOTAL, tiles_a, M, row0, count_ptr, units, epi, B_PRESENT: tl.constexpr,
                 EPILOGUE: tl.constexpr, UNIT_TILES: tl.constexpr, BATCH: tl.constexpr, N_HEADS: tl.constexpr,
                 N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_ROPE: tl.constexpr,
                 DTYPE: tl.constexpr):
    """The epilogue of unit u (kernels/fusions.py) for rows row0 .. row0 + 8 * BATCH - 1 of x, from the
    S slices' partials. RESIDUAL: the last unit to finish turns the squares into inv_rms."""
    UNIT_ROWS: tl.constexpr = 64 * UNIT_TILES
    col = u * UNIT_ROWS + tl.arange(0, UNIT_ROWS)
    ok = col < N_A
    if B_PRESENT and (EPILOGUE != SWIGLU):
        if u * UNIT_TILES >= tiles_a:
            col = N_A + (u * UNIT_TILES - tiles_a) * 64 + tl.arange(0, UNIT_ROWS)
            ok = col < N_TOTAL
    for b in tl.static_range(BATCH):
        m = row0 + b * 8 + tl.arange(0, 8)
        if EPILOGUE == ROPE_KV:
            rope, col0 = epi
            r1, i = rope_pairs(UNIT_ROWS, HEAD_DIM)
            row1 = u * UNIT_ROWS + r1
            x1 = sum_parts(part_ptr, row1, row1 < N_TOTAL, m, M, N_TOTAL, S)
            x2 = sum_parts(part_ptr, row1 + HEAD_DIM // 2, row1 < N_TOTAL, m, M, N_TOTAL, S)
            rope_kv_rows(x1, x2, col0 + row1, row1 < N_TOTAL, i, m, M, rope, N_HEADS, N_KV_HEADS, HEAD_DIM,
                         BLOCK_SIZE, USE_ROPE, DTYPE)
        else:
            value = sum_parts(part_ptr, col, ok, m, M, N_TOTAL, S)
            if EPILOGUE == RESIDUAL:
                h_ptr, stride_h, sq_ptr, inv_ptr, eps = epi
                residual_rows(value, m, M, col, ok, u, h_ptr, stride_h, sq_ptr)
            else:
                y_ptr, stride_ym = epi
                if EPILOGUE == SWIGLU:
                    up = sum_parts(part_ptr, N_A + col, ok, m, M, N_TOTAL, S)
                    value = value * tl.sigmoid(value) * up
                dst = y_ptr + m.to(tl.int64)[None, :] * stride_ym + col[:, None]
                tl.store(dst, round_to(value, y_ptr.dtype.element_ty), mask=(m < M)[None, :] & ok[:, None])
    if EPILOGUE == RESIDUAL:
        h_ptr, stride_h, sq_ptr, inv_ptr, eps = epi
        tl.debug_barrier()
        if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == units - 1:
            rms_from_squares(sq_ptr, inv_ptr, units, M, row0, 8 * BATCH, N_TOTAL, eps)
            tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _qmv_kernel(x_ptr, stride_xm, M, K, norm, A, B, part_ptr, count_ptr, units, units_per_program, epi,
                QTYPE_A: tl.constexpr, QTYPE_B: tl.constexpr, NORM: tl.constexpr, EPILOGUE: tl.constexpr,
                UNIT_TILES: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr, BATCH: tl.constexpr,
                N_HEADS: tl.constexpr = 0, N_KV_HEADS: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0,
                BLOCK_SIZE: tl.constexpr = 0, USE_ROPE: tl.constexpr = False, PDL: tl.constexpr = False):
    """Decode: program (K-slice, range of units) for every row of x (module docstring). Units are
    UNIT_TILES row tiles of part A, then of part B (SWIGLU: gate tile u with up tile u). A slice
    is GROUPS groups of 64 columns; x is loaded SUB groups at a time (SUB < GROUPS: one unit per
    program). PDL: launched with programmatic dependent launch (kernels/pdl.py)."""
    wait_for_inputs(PDL)
    s = tl.program_id(0)
    first = tl.program_id(1) * units_per_program
    S = tl.num_programs(0)
    N_A = A[10]
    N_TOTAL = N_A + B[10]
    # The dots' operand type: x's (weights as exact integers); fp32 under the interpreter, whose
    # dot cannot multiply 16-bit floats (products of 16-bit values are exact in fp32 anyway).
    DTYPE: tl.constexpr = tl.float32 if INTERPRETED else x_ptr.dtype.element_ty
    tiles_a = tl.cdiv(N_A, 64)
    last = tl.minimum(first + units_per_program, units)
    g_begin = s * GROUPS
    if GROUPS == SUB:
        # The slice's x, loaded once for all the program's units.
        xs = x_slice(x_ptr, stride_xm, M, K, 0, g_begin, NORM, norm, GROUPS, BATCH, DTYPE)
        # One loop per part, so each loop decodes one type (and is software-pipelined).
        for t in range(first * UNIT_TILES, tl.minimum(last * UNIT_TILES, tiles_a)):
            n, ok = tile_rows(A, t)
            accs = products(zero_tiles(BATCH), xs, A, t, g_begin, K, QTYPE_A, GROUPS, BATCH, DTYPE)
            store_part(part_ptr, accs, s, n, ok, N_TOTAL, 0, M, BATCH)
            if EPILOGUE == SWIGLU:
                accs = products(zero_tiles(BATCH), xs, B, t, g_begin, K, QTYPE_B, GROUPS, BATCH, DTYPE)
                store_part(part_ptr, accs, s, N_A + n, ok, N_TOTAL, 0, M, BATCH)
        if (QTYPE_B is not None) and (EPILOGUE != SWIGLU):
            for t in range(tl.maximum(first * UNIT_TILES, tiles_a), last * UNIT_TILES):
                n, ok = tile_rows(B, t - tiles_a)
                accs = products(zero_tiles(BATCH), xs, B, t - tiles_a, g_begin, K, QTYPE_B, GROUPS, BATCH, DTYPE)
                store_part(part_ptr, accs, s, N_A + n, ok, N_TOTAL, 0, M, BATCH)
    else:
        # A slice of several x chunks (SUB groups each): one unit per program, its slice
        # streamed chunk by chunk, each chunk of x loaded once for the unit's tiles.
        streamed_unit(first, s, (x_ptr, stride_xm, M, K, 0, norm), A, B, part_ptr, N_A, N_TOTAL, tiles_a,
                      g_begin, tl.minimum(g_begin + GROUPS, tl.cdiv(K, 64)), QTYPE_A, QTYPE_B, EPILOGUE,
                      UNIT_TILES, SUB, BATCH, DTYPE, NORM)
    release_next(PDL)
    # Every thread's partial stores land before the counts say so; the last of the S slices
    # of a unit finishes it and re-arms its counter.
    tl.debug_barrier()
    for u in range(first, last):
        if tl.atomic_add(count_ptr + u, 1, sem="acq_rel", scope="gpu") == S - 1:
            _finish_unit(u, part_ptr, S, N_A, N_TOTAL, tiles_a, M, 0, count_ptr + units, units, epi,
                         QTYPE_B is not None, EPILOGUE, UNIT_TILES, BATCH, N_HEADS, N_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                         USE_ROPE, x_ptr.dtype.element_ty)
            tl.atomic_xchg(count_ptr + u, 0)


@triton.jit
def _slices_summed(xs_args, part, t, S, QTYPE: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr,
                   BATCH: tl.constexpr, DTYPE: tl.constexpr, NORM: tl.constexpr):
    """Tile t of a part times x rows row0 .. row0 + 8 * BATCH - 1: the slices' products summed in
    slice order, exactly as the decode kernel's last program sums its partials."""
    x_ptr, stride_xm, M, K, row0, norm = xs_args
    n, ok = tile_rows(part, t)
    totals = zero_tiles(BATCH)
    for s in range(0, S):
        if GROUPS == SUB:
            xs = x_slice(x_ptr, stride_xm, M, K, row0, s * GROUPS, NORM, norm, GROUPS, BATCH, DTYPE)
            accs = products(zero_tiles(BATCH), xs, part, t, s * GROUPS, K, QTYPE, GROUPS, BATCH, DTYPE)
        else:
            accs = streamed(zero_tiles(BATCH), xs_args, part, t, s * GROUPS,
                                 tl.minimum(s * GROUPS + GROUPS, tl.cdiv(K, 64)), QTYPE, SUB, BATCH, DTYPE, NORM)
        summed = ()
        for b in tl.static_range(BATCH):
            summed = summed + (totals[b] + accs[b],)
        totals = summed
    return totals, n, ok


@triton.jit
def _qmm_kernel(x_ptr, stride_xm, M, K, norm, A, B, part_ptr, count_ptr, units, S, epi,
                QTYPE_A: tl.constexpr, QTYPE_B: tl.constexpr, NORM: tl.constexpr, EPILOGUE: tl.constexpr,
                UNIT_TILES: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr, BATCH: tl.constexpr,
                N_HEADS: tl.constexpr = 0, N_KV_HEADS: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0,
                BLOCK_SIZE: tl.constexpr = 0, USE_ROPE: tl.constexpr = False):
    """Prefill: program (unit, 8 * BATCH rows of x). Its sums go to its own rows of a one-slice
    partial buffer, then the decode kernel's epilogue runs on them (a CTA barrier between)."""
    u = tl.program_id(0)
    row_block = tl.program_id(1)
    row0 = row_block * (8 * BATCH)
    N_A = A[10]
    N_TOTAL = N_A + B[10]
    DTYPE: tl.constexpr = tl.float32 if INTERPRETED else x_ptr.dtype.element_ty
    tiles_a = tl.cdiv(N_A, 64)
    xs_args = (x_ptr, stride_xm, M, K, row0, norm)
    for j in tl.static_range(UNIT_TILES):
        t = u * UNIT_TILES + j
        if EPILOGUE == SWIGLU:
            totals, n, ok = _slices_summed(xs_args, A, t, S, QTYPE_A, GROUPS, SUB, BATCH, DTYPE, NORM)
            store_part(part_ptr, totals, 0, n, ok, N_TOTAL, row0, M, BATCH)
            totals, n, ok = _slices_summed(xs_args, B, t, S, QTYPE_B, GROUPS, SUB, BATCH, DTYPE, NORM)
            store_part(part_ptr, totals, 0, N_A + n, ok, N_TOTAL, row0, M, BATCH)
        elif t < tiles_a:          # without a part B every tile is part A's
            totals, n, ok = _slices_summed(xs_args, A, t, S, QTYPE_A, GROUPS, SUB, BATCH, DTYPE, NORM)
            store_part(part_ptr, totals, 0, n, ok, N_TOTAL, row0, M, BATCH)
        else:
            if QTYPE_B is not None:
                totals, n, ok = _slices_summed(xs_args, B, t - tiles_a, S, QTYPE_B, GROUPS, SUB, BATCH, DTYPE, NORM)
                store_part(part_ptr, totals, 0, N_A + n, ok, N_TOTAL, row0, M, BATCH)
    tl.debug_barrier()
    _finish_unit(u, part_ptr, 1, N_A, N_TOTAL, tiles_a, M, row0, count_ptr + row_block, units, epi,
                 QTYPE_B is not None, EPILOGUE, UNIT_TILES, BATCH, N_HEADS, N_KV_HEADS, HEAD_DIM, BLOCK_SIZE, USE_ROPE,
                 x_ptr.dtype.element_ty)


# ----------------------------------------------------------------------------- launch

def sm_count(device: torch.device) -> int:
    """SMs the slices are sized for; without a GPU an H200's 132, so the CPU computes the same
    slices (the same sums) as that GPU."""
    sms = gpu.arch_and_sms(device)[1]
    return 132 if sms is None else sms


def x_chunk_groups(k: int, groups: int) -> int:
    """Groups of x a program loads at a time for slices of `groups` groups: at most 4 (64 rows
    of them fill 64 registers a thread), and a divisor of the slice and of K's groups, so
    that no chunk reaches past K."""
    return math.gcd(groups, triton.cdiv(k, GROUP), 4)


def slice_groups(k: int, units: int, sms: int) -> int:
    """64-column groups per K-slice, from the weight's shape, its epilogue's unit and the GPU
    only. A weight whose units give every SM two programs is not split (one slice: no
    partials to speak of at 64 rows, where the LM head's would be 260 MB; x then streams
    through each program a chunk at a time). Otherwise the most of 4, 2, 1 that still gives
    every SM two (slice, unit) programs at M = 1: a slice's x stays in registers for all
    of a program's units (wider slices would stream x once per unit, which costs more
    instructions at 64 rows than their fewer partials save, bench/README.md)."""
    groups_k = triton.cdiv(k, GROUP)
    if units >= 2 * sms:
        return groups_k
    for groups in (4, 2):
        if triton.cdiv(groups_k, groups) * units >= 2 * sms:
            return groups
    return 1


def units_per_program(slices: int, units: int, sms: int) -> int:
    """Units a decode program of a held slice loops over (its x loaded once for all of them).
    A launch lasts as long as its busiest SM, which runs ceil(programs / sms) programs of up to
    that many units each, plus each program's own code (x, partial stores, counters: about one
    unit's loop in the SASS). The count that minimises this while every SM still gets two
    programs; on a tie the most units (fewer programs). The result does not depend on it."""
    best, best_cost = 1, None
    for per in range(1, units + 1):
        programs = slices * triton.cdiv(units, per)
        if programs < 2 * sms:
            break
        cost = triton.cdiv(programs, sms) * (per + 1)
        if best_cost is None or cost <= best_cost:
            best, best_cost = per, cost
    return best


def _plane_args(p: TiledTensor) -> list:
    """Five plane pointers and five row strides; an absent plane is stood in for by qw (never read)."""
    planes = [p.qw if t is None else t for t in p.planes]
    return planes + [0 if t is None else t.stride(0) for t in p.planes]


def check_input(x: torch.Tensor, w, what: str) -> None:
    if x.dim() != 2:
        raise KernelInputError(f"{what}: x must be 2-D [M, K], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelInputError(f"{what}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] != w.shape[1]:
        raise KernelInputError(f"{what}: x has {x.shape[1]} columns but the weight {list(w.shape)} "
                               f"expects {w.shape[1]}")
    if x.device != w.device:
        raise KernelInputError(f"{what}: x is on {x.device} but the weight is on {w.device}")


def launch(x: torch.Tensor, a: TiledTensor, b: TiledTensor | None, groups: int, epilogue: int, epi: tuple, *,
           norm: tuple | None = None, unit_tiles: int = 1, consts: dict | None = None) -> None:
    """x (or RMSNorm(x) with norm = (inv_rms, weight)) @ [a; b].T, finished by `epilogue`
    (kernels/fusions.py) with its arguments `epi`, by the decode or the prefill kernel.
    SWIGLU pairs tile u of a (gate) with tile u of b (up). RESIDUAL: epi = (h, inv_rms, eps)."""
    M, K = x.shape
    n_a = a.shape[0]
    n_b = b.shape[0] if b is not None else 0
    tiles_a = triton.cdiv(n_a, BLOCK_N)
    units = tiles_a if epilogue == SWIGLU else triton.cdiv(tiles_a + triton.cdiv(n_b, BLOCK_N), unit_tiles)
    S = triton.cdiv(triton.cdiv(K, GROUP), groups)
    sub = x_chunk_groups(K, groups)
    if sub < groups and M > 32:
        sub = 1      # a streamed slice past 32 rows: 4 groups of 64 rows of x would take 64 registers
    # Both kernels compute the same sums (same slices, same order), so the choice may follow M:
    # split-K up to DECODE_ROWS rows of x (each weight tile decoded once for every row), the
    # slices summed in registers for prompts.
    decode = M <= DECODE_ROWS
    if decode:
        batch = triton.next_power_of_2(triton.cdiv(M, 8))
    else:
        # Two 8-row tiles of x per program (one for gate+up, which holds both): more spill.
        batch = min(1 if epilogue == SWIGLU else PREFILL_BATCH, triton.next_power_of_2(triton.cdiv(M, 8)))
    row_blocks = 1 if decode else triton.cdiv(M, 8 * batch)
    if epilogue == RESIDUAL:
        h, inv_rms, eps = epi
        epi = (h, h.stride(0), torch.empty((units, M), dtype=torch.float32, device=x.device), inv_rms, float(eps))
    part_a = (*_plane_args(a), n_a)
    part_b = (*_plane_args(b), n_b) if b is not None else (*_plane_args(a), 0)
    norm = norm if norm is not None else (x, x)
    count = counters(x.device, units + row_blocks)
    kw = dict(QTYPE_A=int(a.qtype), QTYPE_B=None if b is None else int(b.qtype), NORM=norm[0] is not x,
              EPILOGUE=getattr(epilogue, "value", epilogue), UNIT_TILES=unit_tiles, GROUPS=groups, SUB=sub,
              BATCH=batch,
              num_warps=4, num_stages=2 if decode else 1, **(consts or {}))
    if decode:
        # One unit per program where a slice is streamed.
        per_program = 1 if sub < groups else units_per_program(S, units, sm_count(x.device))
        part = torch.empty((S, n_a + n_b, M), dtype=torch.float32, device=x.device)
        _qmv_kernel[(S, triton.cdiv(units, per_program))](x, x.stride(0), M, K, norm, part_a, part_b, part, count,
                                                          units, per_program, epi, **kw, **launch_options(x.device),
                                                          **gpu.FP_FUSION)
    else:
        part = torch.empty((1, n_a + n_b, M), dtype=torch.float32, device=x.device)
        _qmm_kernel[(units, row_blocks)](x, x.stride(0), M, K, norm, part_a, part_b, part, count, units, S, epi,
                                         **kw, **gpu.FP_FUSION)


def two_parts(w: Tiled, unit_tiles: int = 1) -> list[tuple[int, TiledTensor, TiledTensor | None]]:
    """The weight as launches (first output row, part A, part B or None) of at most two parts,
    part A a whole number of units of unit_tiles row tiles."""
    segs = segments(w)
    out = []
    while segs:
        row, a = segs.pop(0)
        if segs and a.shape[0] % (BLOCK_N * unit_tiles) == 0:
            out.append((row, a, segs.pop(0)[1]))
        else:
            out.append((row, a, None))
    return out


def prepared(x: torch.Tensor, w, what: str, unit_rows: int = BLOCK_N):
    """(x with unit column stride, w tiled, the weight's K-slice groups for units of unit_rows
    output rows), inputs checked."""
    w = tiled(w)
    check_input(x, w, what)
    if x.stride(1) != 1:
        x = x.contiguous()
    return x, w, slice_groups(x.shape[1], triton.cdiv(w.shape[0], unit_rows), sm_count(x.device))


def qmatmul_triton(x: torch.Tensor, w: Weight | Tiled, *, out_dtype: torch.dtype | None = None,
                   norm: tuple | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in out_dtype (default x's dtype), fp32 accumulation; same
    semantics as qmatmul_torch. With norm = (inv_rms [M] fp32, weight [K]), x is first replaced
    by RMSNorm(x) = round(x * inv_rms * weight) (the LM head after the final norm). `w` should
    come from prepare_tiles (once at load); a raw weight is tiled on first use and kept."""
    x, w, groups = prepared(x, w, "qmatmul")
    M, N = x.shape[0], w.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    # A streamed slice's program takes two tiles up to PAIRED_STREAM_ROWS rows of x, each chunk
    # of x loaded once for both (the same sums per tile: the bits do not depend on it).
    streamed = groups > x_chunk_groups(x.shape[1], groups)
    unit_tiles = 2 if streamed and M <= PAIRED_STREAM_ROWS else 1
    if M:
        for row, a, b in two_parts(w, unit_tiles):
            rows = a.shape[0] + (b.shape[0] if b is not None else 0)
            out = y[:, row:row + rows]
            launch(x, a, b, groups, STORE, (out, out.stride(0)), norm=norm, unit_tiles=unit_tiles)
    return y


def add_qmatmul_triton(x: torch.Tensor, w: Weight | Tiled, h: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after a branch: h += round(x @ w.T) in place, and inv_rms [M] of the new
    h (1 / sqrt(mean(h^2) + eps)) for the next RMSNorm. One launch."""
    x, w, groups = prepared(x, w, "qmatmul")
    M, N = x.shape[0], w.shape[0]
    if h.shape != (M, N) or h.stride(1) != 1:
        raise KernelInputError(f"qmatmul: the residual stream must be [{M}, {N}] with unit column stride, "
                               f"got {tuple(h.shape)} strides {h.stride()}")
    launches = two_parts(w)
    if len(launches) != 1:
        raise KernelInputError(f"qmatmul: a residual update takes a weight of at most two parts, part A a whole "
                               f"number of {BLOCK_N}-row tiles; got parts of {[p.shape[0] for _, p in segments(w)]}")
    inv_rms = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _, a, b = launches[0]
        launch(x, a, b, groups, RESIDUAL, (h, inv_rms, eps))
    return h, inv_rms
