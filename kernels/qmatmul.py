"""y = x @ dequant(W).T for GGUF-quantized weights on the tile layout (kernels/qtiles.py).

Reference: `qmatmul_torch`: dequantize the whole matrix to fp32, matmul in fp32.

One arithmetic for every row, whatever the batch:
- W is cut into K-slices of GROUPS x 64 columns, a fixed count per weight (from its shape
  and the GPU's SM count, never from M). A slice's product with x is computed by
  `tile_products` (kernels/qdecode.py): weights as exact bf16 integers in the left
  operand of m16n8k16 tensor-core dots, x in tiles of 8 rows as the right operand, each
  16-column chunk's fp32 dot product times its scale; the slices' products are summed in
  slice order. A row's result is bitwise the same alone, in any batch and in a prompt:
  the same instructions in the same order compute it, and MMA outputs do not mix columns.
- Decode (M <= DECODE_ROWS), `_qmv_kernel`: program (slice s, range of row tiles) loads its
  slice of x once (every row of x), decodes each weight tile once for all 8-row tiles of
  x, and stores fp32 partials; the last program to finish a tile (an atomic counter per
  tile) sums the slices' partials in slice order and writes y. One launch, bandwidth-bound
  by construction: enough programs for every SM at M = 1, 16-byte loads of quants, a few
  LOP3 + one bf16x2 FMA per two weights, x read once per program.
- Prefill (M > DECODE_ROWS), `_qmm_kernel`: program (row tile, 64 rows of x) walks the
  slices in order, summing their products in registers: the decode kernel's sums, without
  partials in memory.
- PAIRED (gate+up, kernels/swiglu.py): unit u is gate tile u and up tile u; y = silu(gate) * up.
A weight of two types (a Q4_K_M file's fused QKV) is one launch: each row tile belongs to
one part, which picks its decoding path (both compiled in).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from ..gguf.tensors import Weight
from .qdecode import INTERPRETED, round_to, tile_products, x_chunk
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
PREFILL_BATCH = 4      # 8-row tiles of x per prefill program


@triton.jit
def _x_slice(x_ptr, stride_xm, M, K, row0, s, GROUPS: tl.constexpr, BATCH: tl.constexpr, DTYPE: tl.constexpr):
    """x rows row0 .. row0 + 8 * BATCH - 1, columns of K-slice s, as tile_products takes them."""
    xs = ()
    for b in tl.static_range(BATCH):
        m = row0 + b * 8 + tl.arange(0, 8)
        for i in tl.static_range(GROUPS):
            k0 = (s * GROUPS + i) * 64
            xs = xs + (x_chunk(x_ptr, stride_xm, m, m < M, k0, K, DTYPE),
                       x_chunk(x_ptr, stride_xm, m, m < M, k0 + 16, K, DTYPE),
                       x_chunk(x_ptr, stride_xm, m, m < M, k0 + 32, K, DTYPE),
                       x_chunk(x_ptr, stride_xm, m, m < M, k0 + 48, K, DTYPE))
    return xs


@triton.jit
def _store_rows(y_ptr, stride_ym, M, m, out_col, ok, value, PAIRED: tl.constexpr, up):
    """y[m, out_col] = value (or silu(value) * up when PAIRED), in y's dtype."""
    if PAIRED:
        value = value * tl.sigmoid(value) * up
    dst = y_ptr + m.to(tl.int64)[None, :] * stride_ym + out_col[:, None]
    tl.store(dst, round_to(value, y_ptr.dtype.element_ty), mask=(m < M)[None, :] & ok[:, None])


@triton.jit
def _sum_parts(part_ptr, col, ok, m, MP, N_TOTAL, S):
    """sum over slices s = 0 .. S-1, in that order, of part[s, col, m] -> fp32 [cols, rows m]."""
    acc = tl.zeros([col.shape[0], m.shape[0]], tl.float32)
    for s in range(0, S):
        src = part_ptr + (s * N_TOTAL + col.to(tl.int64))[:, None] * MP + m[None, :]
        acc += tl.load(src, mask=ok[:, None], other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _store_part(part_ptr, accs, s, col, ok, N_TOTAL, BATCH: tl.constexpr):
    """part[s, col, m] = accs (rows of x fastest, as the MMA's registers hold them)."""
    for b in tl.static_range(BATCH):
        dst = part_ptr + (s * N_TOTAL + col.to(tl.int64))[:, None] * (8 * BATCH) + (b * 8 + tl.arange(0, 8))[None, :]
        tl.store(dst, accs[b], mask=ok[:, None])


@triton.jit
def _qmv_kernel(x_ptr, stride_xm, M, K, y_ptr, stride_ym, part_ptr, count_ptr, units, units_per_program,
                a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, N_A,
                b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, N_B,
                QTYPE_A: tl.constexpr, QTYPE_B: tl.constexpr, PAIRED: tl.constexpr,
                GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BATCH: tl.constexpr):
    """Decode: program (K-slice, range of units) for every row of x (module docstring).
    Units are row tiles: part A's, then part B's (PAIRED: gate tile u with up tile u)."""
    s = tl.program_id(0)
    first = tl.program_id(1) * units_per_program
    S = tl.num_programs(0)
    N_TOTAL = N_A + N_B
    # The dots' operand type: x's (weights as exact integers); fp32 under the interpreter, whose
    # dot cannot multiply 16-bit floats (products of 16-bit values are exact in fp32 anyway).
    DTYPE: tl.constexpr = tl.float32 if INTERPRETED else x_ptr.dtype.element_ty
    xs = _x_slice(x_ptr, stride_xm, M, K, 0, s, GROUPS, BATCH, DTYPE)
    tiles_a = tl.cdiv(N_A, BLOCK_N)
    last = tl.minimum(first + units_per_program, units)
    r = tl.arange(0, BLOCK_N)
    # One loop per part, so each loop decodes one type (and is software-pipelined).
    for u in range(first, tl.minimum(last, tiles_a)):
        col = u * BLOCK_N + r
        accs = tile_products(xs, a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, col,
                             col < N_A, s * GROUPS, K, QTYPE_A, GROUPS, BATCH, DTYPE)
        _store_part(part_ptr, accs, s, col, col < N_A, N_TOTAL, BATCH)
        if PAIRED:
            accs = tile_products(xs, b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, col,
                                 col < N_B, s * GROUPS, K, QTYPE_B, GROUPS, BATCH, DTYPE)
            _store_part(part_ptr, accs, s, N_A + col, col < N_B, N_TOTAL, BATCH)
    if not PAIRED:
        if QTYPE_B is not None:
            for u in range(tl.maximum(first, tiles_a), last):
                n = (u - tiles_a) * BLOCK_N + r
                accs = tile_products(xs, b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, n,
                                     n < N_B, s * GROUPS, K, QTYPE_B, GROUPS, BATCH, DTYPE)
                _store_part(part_ptr, accs, s, N_A + n, n < N_B, N_TOTAL, BATCH)
    # Every thread's partial stores land before the counts say so; the last of the S slices
    # of a unit writes the unit's output and re-arms its counter.
    tl.debug_barrier()
    for u in range(first, last):
        counter = count_ptr + u
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == S - 1:
            col = u * BLOCK_N + r
            ok = col < N_A
            if not PAIRED:
                if QTYPE_B is not None:
                    if u >= tiles_a:
                        col = N_A + (u - tiles_a) * BLOCK_N + r
                        ok = col < N_TOTAL
            for b in tl.static_range(BATCH):
                m = b * 8 + tl.arange(0, 8)
                value = _sum_parts(part_ptr, col, ok, m, 8 * BATCH, N_TOTAL, S)
                up = value
                if PAIRED:
                    up = _sum_parts(part_ptr, N_A + col, ok, m, 8 * BATCH, N_TOTAL, S)
                _store_rows(y_ptr, stride_ym, M, m, col, ok, value, PAIRED, up)
            tl.atomic_xchg(counter, 0)


@triton.jit
def _slices_summed(x_ptr, stride_xm, M, K, row0, S, qw, qh, sc, sm, sd, s_qw, s_qh, s_sc, s_sm, s_sd, n, ok,
                   QTYPE: tl.constexpr, GROUPS: tl.constexpr, BATCH: tl.constexpr, DTYPE: tl.constexpr):
    """Rows n of W times x rows row0 .. row0 + 8 * BATCH - 1: the slices' products summed in
    slice order, exactly as the decode kernel's last program sums its partials."""
    totals = ()
    for b in tl.static_range(BATCH):
        totals = totals + (tl.zeros([n.shape[0], 8], tl.float32),)
    for s in range(0, S):
        xs = _x_slice(x_ptr, stride_xm, M, K, row0, s, GROUPS, BATCH, DTYPE)
        accs = tile_products(xs, qw, qh, sc, sm, sd, s_qw, s_qh, s_sc, s_sm, s_sd, n, ok, s * GROUPS, K, QTYPE,
                             GROUPS, BATCH, DTYPE)
        summed = ()
        for b in tl.static_range(BATCH):
            summed = summed + (totals[b] + accs[b],)
        totals = summed
    return totals


@triton.jit
def _qmm_kernel(x_ptr, stride_xm, M, K, y_ptr, stride_ym, S,
                a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh, a_s_sc, a_s_sm, a_s_sd, N_A,
                b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh, b_s_sc, b_s_sm, b_s_sd, N_B,
                QTYPE_A: tl.constexpr, QTYPE_B: tl.constexpr, PAIRED: tl.constexpr,
                GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BATCH: tl.constexpr):
    """Prefill: program (unit, 8 * BATCH rows of x); no partials in memory."""
    u = tl.program_id(0)
    row0 = tl.program_id(1) * (8 * BATCH)
    DTYPE: tl.constexpr = tl.float32 if INTERPRETED else x_ptr.dtype.element_ty
    tiles_a = tl.cdiv(N_A, BLOCK_N)
    r = tl.arange(0, BLOCK_N)
    if PAIRED:
        col = u * BLOCK_N + r
        ok = col < N_A
        gate = _slices_summed(x_ptr, stride_xm, M, K, row0, S, a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh,
                              a_s_sc, a_s_sm, a_s_sd, col, ok, QTYPE_A, GROUPS, BATCH, DTYPE)
        up = _slices_summed(x_ptr, stride_xm, M, K, row0, S, b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh,
                            b_s_sc, b_s_sm, b_s_sd, col, ok, QTYPE_B, GROUPS, BATCH, DTYPE)
        for b in tl.static_range(BATCH):
            _store_rows(y_ptr, stride_ym, M, row0 + b * 8 + tl.arange(0, 8), col, ok, gate[b], True, up[b])
    elif u < tiles_a:          # without a part B every unit is part A's
        col = u * BLOCK_N + r
        ok = col < N_A
        out = _slices_summed(x_ptr, stride_xm, M, K, row0, S, a_qw, a_qh, a_sc, a_sm, a_sd, a_s_qw, a_s_qh,
                             a_s_sc, a_s_sm, a_s_sd, col, ok, QTYPE_A, GROUPS, BATCH, DTYPE)
        for b in tl.static_range(BATCH):
            _store_rows(y_ptr, stride_ym, M, row0 + b * 8 + tl.arange(0, 8), col, ok, out[b], False, out[b])
    else:
        if QTYPE_B is not None:
            n = (u - tiles_a) * BLOCK_N + r
            ok = n < N_B
            out = _slices_summed(x_ptr, stride_xm, M, K, row0, S, b_qw, b_qh, b_sc, b_sm, b_sd, b_s_qw, b_s_qh,
                                 b_s_sc, b_s_sm, b_s_sd, n, ok, QTYPE_B, GROUPS, BATCH, DTYPE)
            for b in tl.static_range(BATCH):
                _store_rows(y_ptr, stride_ym, M, row0 + b * 8 + tl.arange(0, 8), N_A + n, ok, out[b], False,
                            out[b])


# ----------------------------------------------------------------------------- launch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 16


def _counters(device: torch.device, need: int) -> torch.Tensor:
    """Zeroed int32 counters, one per unit; every launch leaves them zeroed. Allocated once
    per device (before any CUDA-graph capture: warm-up runs come first)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < need:
        buf = _COUNTERS[device] = torch.zeros(max(_COUNTER_SLOTS, need), dtype=torch.int32, device=device)
    return buf


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs the slices are sized for; without a GPU an H200's 132, so the CPU computes the same
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


def launch(x: torch.Tensor, y: torch.Tensor, a: TiledTensor, b: TiledTensor | None, paired: bool,
           groups: int) -> None:
    """y = x @ [a; b].T (or silu(x @ a.T) * (x @ b.T) when paired), by the decode or the prefill kernel."""
    M, K = x.shape
    n_a = a.shape[0]
    n_b = b.shape[0] if b is not None else 0
    tiles_a = triton.cdiv(n_a, BLOCK_N)
    units = tiles_a if paired else tiles_a + triton.cdiv(n_b, BLOCK_N)
    S = triton.cdiv(triton.cdiv(K, GROUP), groups)
    planes = [*_plane_args(a), n_a, *(_plane_args(b) if b is not None else _plane_args(a)), n_b]
    consts = dict(QTYPE_A=int(a.qtype), QTYPE_B=None if b is None else int(b.qtype), PAIRED=paired, GROUPS=groups,
                  BLOCK_N=BLOCK_N, num_warps=4)
    if M <= DECODE_ROWS:
        batch = triton.next_power_of_2(triton.cdiv(M, 8))
        # Units per program: about 4 programs per SM at M = 1 (the result does not depend on it).
        per_program = max(1, (S * units) // (4 * sm_count(x.device)))
        part = torch.empty((S, n_a + n_b, 8 * batch), dtype=torch.float32, device=x.device)
        _qmv_kernel[(S, triton.cdiv(units, per_program))](
            x, x.stride(0), M, K, y, y.stride(0), part, _counters(x.device, units), units, per_program, *planes,
            BATCH=batch, num_stages=2, **consts)
    else:
        _qmm_kernel[(units, triton.cdiv(M, 8 * PREFILL_BATCH))](
            x, x.stride(0), M, K, y, y.stride(0), S, *planes, BATCH=PREFILL_BATCH, num_stages=2, **consts)


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


def qmatmul_triton(x: torch.Tensor, w: Weight | Tiled, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in out_dtype (default x's dtype), fp32 accumulation; same
    semantics as qmatmul_torch. `w` should come from prepare_tiles (once at load); a raw weight
    is repacked on first use and the tiles kept while it lives."""
    w = tiled(w)
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
        launch(x, y[:, row:row + rows], a, b, False, groups)
        row += rows
    return y
