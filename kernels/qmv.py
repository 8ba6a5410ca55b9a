"""y = x @ dequant(W).T for decode and small batches (M <= MAX_ROWS), on the tile layout.

Reference: `qmatmul_torch` (kernels/qmatmul.py): dequantize to fp32, matmul in fp32.

One kernel for every M in 1..64, bandwidth-bound by construction:
- The weight is the left operand of the tensor-core dot: a program computes a
  [BLOCK_N rows, BLOCK_M = 16 rows of x] tile, so one row of x pads to 16, and the
  dequantized weights go straight from registers into the MMA (kernels/qdecode.py: a
  few LOP3 + one bf16x2 FMA per two weights, exact integers; the per-chunk scale is
  applied to the chunk's fp32 dot product, never rounded into the weight).
- Split-K with a FIXED slice per weight: program (slice s, row tiles, batch tile) loads
  its K-slice of x once (GROUPS x 64 columns x 16 rows), then loops over its row tiles,
  writing each tile's fp32 partial. The slice count depends on the weight's shape and
  the GPU's SM count, never on M.
- The last program to finish a tile (an atomic counter per tile and batch tile) sums
  the slices' partials in slice order and writes y: one launch, no torch sum, and a
  row's result is bitwise the same whatever M and whatever the other rows hold (same
  tile, same reduction order; MMA outputs do not mix rows).
- PAIRED (gate+up): unit u is gate tile u and up tile u; its last program writes
  silu(gate) * up. The intermediate [M, 2I] never reaches memory except as partials.
A weight of two types (a Q4_K_M file's fused QKV or gate+up) is one launch: each row tile
belongs to one part, which picks the decoding code path (both compiled in).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from .qdecode import BF16, F16, F32, INTERPRETED, Q4_1, Q4_K, Q5_1, Q5_K, Q6_K, chunks, scales
from .qtiles import GROUP, Tiled, TiledTensor, prepare_tiles, segments

MAX_ROWS = 64          # rows of x this kernel takes; more go to the prefill GEMM
BLOCK_M = 8            # rows of x per program (tensor-core tile), for every M
BLOCK_N = 64           # weight rows per tile


@triton.jit
def _x_chunk(x_ptr, stride_xm, m, m_ok, k0, K, DTYPE: tl.constexpr):
    """x[m, k0 : k0 + 16] as the dot's right operand [16, BLOCK_M] in DTYPE (0 outside)."""
    k = k0 + tl.arange(0, 16)
    x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                other=0.0)
    return tl.trans(x.to(DTYPE))


@triton.jit
def _dot(a, b, acc):
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _tile(xs, qw_ptr, qh_ptr, sc_ptr, sm_ptr, sd_ptr, s_qw, s_qh, s_sc, s_sm, s_sd,
          n, n_ok, g0, K, QTYPE: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
          DTYPE: tl.constexpr):
    """fp32 [rows n, BLOCK_M] partial over groups g0 .. g0 + GROUPS - 1 (x chunks `xs`)."""
    IS_FLOAT: tl.constexpr = (QTYPE == F32) or (QTYPE == F16) or (QTYPE == BF16)
    HAS_BIAS: tl.constexpr = (QTYPE == Q4_K) or (QTYPE == Q5_K) or (QTYPE == Q4_1) or (QTYPE == Q5_1)
    acc = tl.zeros([n.shape[0], BLOCK_M], tl.float32)
    for i in tl.static_range(GROUPS):
        g = g0 + i
        c0, c1, c2, c3 = chunks(qw_ptr, qh_ptr, s_qw, s_qh, n, n_ok, g, K, QTYPE, DTYPE)
        if IS_FLOAT:
            acc = _dot(c0, xs[4 * i], acc)
            acc = _dot(c1, xs[4 * i + 1], acc)
            acc = _dot(c2, xs[4 * i + 2], acc)
            acc = _dot(c3, xs[4 * i + 3], acc)
        else:
            mul0, mul1, mul2, mul3, bias_a, bias_b = scales(sc_ptr, sm_ptr, sd_ptr, s_sc, s_sm, s_sd, n, n_ok, g,
                                                            QTYPE)
            # Each sub-block's dot product times its multiplier, accumulated as FMAs.
            if QTYPE == Q6_K:
                acc += _dot(c0, xs[4 * i], None) * mul0[:, None]
                acc += _dot(c1, xs[4 * i + 1], None) * mul1[:, None]
                acc += _dot(c2, xs[4 * i + 2], None) * mul2[:, None]
                acc += _dot(c3, xs[4 * i + 3], None) * mul3[:, None]
            else:
                acc += _dot(c1, xs[4 * i + 1], _dot(c0, xs[4 * i], None)) * mul0[:, None]
                acc += _dot(c3, xs[4 * i + 3], _dot(c2, xs[4 * i + 2], None)) * mul2[:, None]
                if HAS_BIAS:
                    # Each sub-block's sum of x, as a dot with ones: it lands in the
                    # accumulator's layout (a broadcast of a reduction would be converted
                    # through shared memory every group).
                    ones = tl.full(c0.shape, 1.0, c0.dtype)
                    acc += _dot(ones, xs[4 * i + 1], _dot(ones, xs[4 * i], None)) * bias_a[:, None]
                    acc += _dot(ones, xs[4 * i + 3], _dot(ones, xs[4 * i + 2], None)) * bias_b[:, None]
    return acc


@triton.jit
def _part_tile(xs, t, s, m, m_ok, M, N_TOTAL, K, part_ptr,
               a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, N_A,
               b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, N_B,
               QTYPE_A: tl.constexpr, QTYPE_B: tl.constexpr, GROUPS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DTYPE: tl.constexpr):
    """Row tile t (of the whole output: part A's tiles, then part B's) for K-slice s,
    stored as fp32 partial part[s, m, rows]."""
    r = tl.arange(0, BLOCK_N)
    tiles_a = tl.cdiv(N_A, BLOCK_N)
    if QTYPE_B is None:
        col = t * BLOCK_N + r
        col_ok = col < N_A
        acc = _tile(xs, a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, col, col_ok,
                    s * GROUPS, K, QTYPE_A, GROUPS, BLOCK_M, DTYPE)
    elif t < tiles_a:
        col = t * BLOCK_N + r
        col_ok = col < N_A
        acc = _tile(xs, a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, col, col_ok,
                    s * GROUPS, K, QTYPE_A, GROUPS, BLOCK_M, DTYPE)
    else:
        n = (t - tiles_a) * BLOCK_N + r
        col_ok = n < N_B
        acc = _tile(xs, b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, n, col_ok,
                    s * GROUPS, K, QTYPE_B, GROUPS, BLOCK_M, DTYPE)
        col = N_A + n
    dst = part_ptr + (m.to(tl.int64)[None, :] + s * M) * N_TOTAL + col[:, None]
    tl.store(dst, acc, mask=m_ok[None, :] & col_ok[:, None])


@triton.jit
def _sum_parts(part_ptr, col, col_ok, m, m_ok, M, N_TOTAL, S):
    """sum over slices s = 0 .. S-1, in that order, of part[s, m, col] -> fp32 [cols, BLOCK_M]."""
    acc = tl.zeros([col.shape[0], m.shape[0]], tl.float32)
    ok = m_ok[None, :] & col_ok[:, None]
    for s in range(0, S):
        src = part_ptr + (m.to(tl.int64)[None, :] + s * M) * N_TOTAL + col[:, None]
        acc += tl.load(src, mask=ok, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _qmv_kernel(x_ptr, stride_xm, M, K, y_ptr, stride_ym, part_ptr, count_ptr, units, units_per_program,
                a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, N_A,
                b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, N_B,
                QTYPE_A: tl.constexpr, QTYPE_B: tl.constexpr, PAIRED: tl.constexpr,
                GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (K-slice, unit range, batch tile); see the module docstring."""
    s = tl.program_id(0)
    first = tl.program_id(1) * units_per_program
    bt = tl.program_id(2)
    S = tl.num_programs(0)
    n_batch = tl.num_programs(2)
    N_TOTAL = N_A + N_B
    # The dot's operand type: x's (weights as exact integers); fp32 under the interpreter, whose
    # dot cannot multiply 16-bit floats (products of 16-bit values are exact in fp32 anyway).
    DTYPE: tl.constexpr = tl.float32 if INTERPRETED else x_ptr.dtype.element_ty
    m = bt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    # This slice's x, once: 4 chunks per group.
    xs = ()
    for i in tl.static_range(GROUPS):
        k0 = (s * GROUPS + i) * 64
        x0 = _x_chunk(x_ptr, stride_xm, m, m_ok, k0, K, DTYPE)
        x1 = _x_chunk(x_ptr, stride_xm, m, m_ok, k0 + 16, K, DTYPE)
        x2 = _x_chunk(x_ptr, stride_xm, m, m_ok, k0 + 32, K, DTYPE)
        x3 = _x_chunk(x_ptr, stride_xm, m, m_ok, k0 + 48, K, DTYPE)
        xs = xs + (x0, x1, x2, x3)
    r = tl.arange(0, BLOCK_N)
    tiles_a = tl.cdiv(N_A, BLOCK_N)
    last = tl.minimum(first + units_per_program, units)
    for u in range(first, last):
        _part_tile(xs, u, s, m, m_ok, M, N_TOTAL, K, part_ptr,
                   a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, N_A,
                   b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, N_B,
                   QTYPE_A, QTYPE_B, GROUPS, BLOCK_N, BLOCK_M, DTYPE)
        if PAIRED:
            _part_tile(xs, tiles_a + u, s, m, m_ok, M, N_TOTAL, K, part_ptr,
                       a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, N_A,
                       b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, N_B,
                       QTYPE_A, QTYPE_B, GROUPS, BLOCK_N, BLOCK_M, DTYPE)
    # Every thread's partial stores land before the counts say so; the last of the S slices
    # of a unit and batch tile writes the unit's output and re-arms its counter.
    tl.debug_barrier()
    for u in range(first, last):
        counter = count_ptr + u * n_batch + bt
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == S - 1:
            col = u * BLOCK_N + r
            ok = col < N_A
            if PAIRED:
                gate = _sum_parts(part_ptr, col, ok, m, m_ok, M, N_TOTAL, S)
                up = _sum_parts(part_ptr, N_A + col, ok, m, m_ok, M, N_TOTAL, S)
                out = gate * tl.sigmoid(gate) * up
            else:
                if QTYPE_B is not None:
                    if u >= tiles_a:
                        col = N_A + (u - tiles_a) * BLOCK_N + r
                        ok = col < N_TOTAL
                out = _sum_parts(part_ptr, col, ok, m, m_ok, M, N_TOTAL, S)
            dst = y_ptr + m.to(tl.int64)[None, :] * stride_ym + col[:, None]
            tl.store(dst, out.to(y_ptr.dtype.element_ty), mask=m_ok[None, :] & ok[:, None])
            tl.atomic_xchg(counter, 0)


# ----------------------------------------------------------------------------- launch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 16


def _counters(device: torch.device, need: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (unit, batch tile); every launch leaves them zeroed.
    Allocated once per device (before any CUDA-graph capture: warm-up runs come first)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < need:
        buf = _COUNTERS[device] = torch.zeros(max(_COUNTER_SLOTS, need), dtype=torch.int32, device=device)
    return buf


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs the split is sized for; without a GPU an H200's 132, so the CPU runs the same
    slices (the same sums) as that GPU."""
    if device.type != "cuda":
        return 132
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def slice_groups(k: int, tiles: int, sms: int) -> int:
    """64-column groups per K-slice: the most (4, 2, 1) that still gives every SM two
    (slice, tile) programs at M = 1. From the weight's shape and the GPU only."""
    groups_k = triton.cdiv(k, GROUP)
    for groups in (4, 2):
        if triton.cdiv(groups_k, groups) * tiles >= 2 * sms:
            return groups
    return 1


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
    if x.shape[0] > MAX_ROWS:
        raise KernelInputError(f"{what}: the decode kernel takes at most {MAX_ROWS} rows of x, got {x.shape[0]}")


def _two_parts(w: Tiled) -> list[tuple[TiledTensor, TiledTensor | None]]:
    """The weight as launches of at most two parts, part A a whole number of row tiles."""
    segs = [p for _, p in segments(w)]
    out = []
    while segs:
        a = segs.pop(0)
        if segs and a.shape[0] % BLOCK_N == 0:
            out.append((a, segs.pop(0)))
        else:
            out.append((a, None))
    return out


def _launch(x, y, a: TiledTensor, b: TiledTensor | None, paired: bool, groups: int) -> None:
    M, K = x.shape
    n_a = a.shape[0]
    n_b = b.shape[0] if b is not None else 0
    tiles_a, tiles_b = triton.cdiv(n_a, BLOCK_N), triton.cdiv(n_b, BLOCK_N)
    units = tiles_a if paired else tiles_a + tiles_b
    S = triton.cdiv(triton.cdiv(K, GROUP), groups)
    batch_tiles = triton.cdiv(M, BLOCK_M)
    # Units per program: enough programs for ~4 per SM at M = 1 (the result does not depend on it).
    per_program = max(1, (S * units) // (4 * sm_count(x.device)))
    part = torch.empty((S, M, n_a + n_b), dtype=torch.float32, device=x.device)
    counters = _counters(x.device, units * batch_tiles)
    grid = (S, triton.cdiv(units, per_program), batch_tiles)
    _qmv_kernel[grid](x, x.stride(0), M, K, y, y.stride(0), part, counters, units, per_program,
                      *_plane_args(a), n_a, *(_plane_args(b) if b is not None else _plane_args(a)), n_b,
                      QTYPE_A=int(a.qtype), QTYPE_B=None if b is None else int(b.qtype), PAIRED=paired,
                      GROUPS=groups, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
                      num_warps=4, num_stages=2)


def qmv(x: torch.Tensor, w, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M <= 64, K] @ w[N, K].T -> [M, N] in out_dtype (default x's dtype); fp32 accumulation.
    `w` should come from prepare_tiles (once at load)."""
    w = prepare_tiles(w)
    check_input(x, w, "qmatmul")
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    groups = slice_groups(K, triton.cdiv(N, BLOCK_N), sm_count(x.device))
    row = 0
    for a, b in _two_parts(w):
        rows = a.shape[0] + (b.shape[0] if b is not None else 0)
        _launch(x, y[:, row:row + rows], a, b, False, groups)
        row += rows
    return y


def gate_up_swiglu_qmv(x: torch.Tensor, w) -> torch.Tensor:
    """silu(x @ Wg.T) * (x @ Wu.T) [M <= 64, I] in x's dtype; w stacks gate rows then up rows."""
    w = prepare_tiles(w)
    check_input(x, w, "gate_up_swiglu")
    M, K = x.shape
    inter = w.shape[0] // 2
    if w.shape[0] % 2:
        raise KernelInputError(f"gate_up_swiglu: the fused weight {list(w.shape)} has an odd number of rows; "
                               f"expected gate rows then as many up rows")
    y = torch.empty((M, inter), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    gate, up = _halves(w, inter)
    groups = slice_groups(K, 2 * triton.cdiv(inter, BLOCK_N), sm_count(x.device))
    _launch(x, y, gate, up, True, groups)
    return y


def _halves(w: Tiled, inter: int) -> tuple[TiledTensor, TiledTensor]:
    """The gate rows and the up rows, each one part (views, no copy)."""
    segs = segments(w)
    if len(segs) == 1:
        p = segs[0][1]
        return p.rows(0, inter), p.rows(inter, 2 * inter)
    if len(segs) == 2 and segs[0][1].shape[0] == inter:
        return segs[0][1], segs[1][1]
    raise KernelInputError(f"gate_up_swiglu: expected the gate rows and the up rows as one or two parts of "
                           f"{inter} rows, got parts of {[p.shape[0] for _, p in segs]} rows")
