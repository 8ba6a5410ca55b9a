"""y = x @ dequant(W).T for GGUF-quantized weights.

Reference: dequantize the whole matrix to fp32, then matmul in fp32, output in
x's dtype. The Triton kernels are held to this.

Triton path (`qmatmul_triton`): weights are read from the planes of
kernels/repack.py (call `prepare_weight` once at load). Two kernels:

- GEMV (M <= GEMV_MAX_M, decode): a [BLOCK_N, K step] tile of quants is decoded
  in registers once per K step and reused for each of the M rows (4/5/6-bit
  types: each byte is loaded once and decoded into its two adjacent elements); the
  per-sub-block scale multiplies the sub-block's dot product, not each weight:
      sum_k w_k x_k = sum_sub (d*sc) * sum(q x) + (bias) * sum(x)
  with fp32 accumulation and tl.sum. Split-K (fp32 partials, summed after)
  when the output has too few row blocks to fill the GPU.
- tiled (larger M, prefill): a [BLOCK_N, BLOCK_K] tile is dequantized to x's
  dtype and fed to tl.dot; fp32 accumulation. For fp32 inputs the dot runs in
  IEEE fp32 (no TF32), so the result stays within fp32 rounding of the reference.

Why the GEMV stops at M = 4: each row costs one FMA per weight on the CUDA
cores. At H200 bandwidth a Q4_K GEMV streams ~8.5e12 weights/s, and ~3.3e13
fp32 ops/s are all the SMs issue, so beyond a few rows the tl.sum form would be
ALU-bound; tl.dot moves those rows onto the tensor cores for free.

Quants become floats without the int->float convert (which issues at a quarter
of the FP32 rate): a value v < 2^23 OR-ed into the mantissa of 2^23 is the float
2^23 + v, and one subtraction, exact, leaves v minus the type's offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from ..gguf.constants import GGMLType
from ..gguf.tensors import Weight
from .repack import Packed, PackedTensor, PackedWeight, packed

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


# Whether @triton.jit below builds interpreted kernels (it decides when it decorates).
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))

# GGMLType codes, as the kernels' QTYPE constexpr.
_F32 = tl.constexpr(0)
_F16 = tl.constexpr(1)
_Q4_0 = tl.constexpr(2)
_Q4_1 = tl.constexpr(3)
_Q5_0 = tl.constexpr(6)
_Q5_1 = tl.constexpr(7)
_Q8_0 = tl.constexpr(8)
_Q4_K = tl.constexpr(12)
_Q5_K = tl.constexpr(13)
_Q6_K = tl.constexpr(14)
_BF16 = tl.constexpr(30)


@triton.jit
def _exact_f32(v, OFFSET: tl.constexpr):
    """int32 v in [0, 2^23) -> float32(v - OFFSET), exactly, with a LOP and an FADD."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """v.to(dtype) with the GPU's round-to-nearest-even, also under the CPU interpreter,
    whose float32 -> bfloat16 cast truncates."""
    if _INTERPRETED and (dtype == tl.bfloat16) and (v.dtype == tl.float32):
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def _scales(s_ptr, f_ptr, s_row, f_row, sb, K, mask, QTYPE: tl.constexpr):
    """(mul, bias) of sub-block sb (its index along the row): w = quant * mul + bias."""
    if (QTYPE == _Q4_K) or (QTYPE == _Q5_K):
        sup = sb // 8
        d = tl.load(f_ptr + f_row + sup, mask=mask, other=0.0).to(tl.float32)
        dmin = tl.load(f_ptr + f_row + K // 256 + sup, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(s_ptr + s_row + sb, mask=mask, other=0).to(tl.float32)
        mn = tl.load(s_ptr + s_row + K // 32 + sb, mask=mask, other=0).to(tl.float32)
        mul = d * sc
        bias = -(dmin * mn)
    elif QTYPE == _Q6_K:
        d = tl.load(f_ptr + f_row + sb // 16, mask=mask, other=0.0).to(tl.float32)
        mul = d * tl.load(s_ptr + s_row + sb, mask=mask, other=0).to(tl.float32)
        bias = 0.0
    else:
        mul = tl.load(f_ptr + f_row + sb, mask=mask, other=0.0).to(tl.float32)
        if (QTYPE == _Q4_1) or (QTYPE == _Q5_1):
            bias = tl.load(f_ptr + f_row + K // 32 + sb, mask=mask, other=0.0).to(tl.float32)
        else:
            bias = 0.0
    return mul, bias


@triton.jit
def _pair_quants(q_ptr, qh_ptr, q_row, qh_row, k0, sb, j, mask, QTYPE: tl.constexpr, SUB: tl.constexpr):
    """4/5/6-bit types: byte j of sub-block sb (relative to k0) decoded into its two elements
    (k0 + SUB*sb + 2j, the next one), fp32 less the type's offset. Each byte is loaded once."""
    b = tl.load(q_ptr + q_row + k0 // 2 + sb * (SUB // 2) + j, mask=mask, other=0).to(tl.int32)
    lo = b & 15
    hi = b >> 4
    if (QTYPE == _Q5_0) or (QTYPE == _Q5_1) or (QTYPE == _Q5_K):
        # One word holds the fifth bits of the 32-element sub-block.
        h = tl.load(qh_ptr + qh_row + k0 // 32 + sb, mask=mask, other=0) >> (2 * j)
        lo = lo | ((h & 1) << 4)
        hi = hi | ((h & 2) << 3)
    if QTYPE == _Q6_K:
        # One word holds the top two bits of the 16-element sub-block.
        h = tl.load(qh_ptr + qh_row + k0 // 16 + sb, mask=mask, other=0) >> (4 * j)
        lo = lo | ((h & 3) << 4)
        hi = hi | ((h & 12) << 2)
    if QTYPE == _Q4_0:
        OFFSET: tl.constexpr = 8.0
    elif QTYPE == _Q5_0:
        OFFSET: tl.constexpr = 16.0
    elif QTYPE == _Q6_K:
        OFFSET: tl.constexpr = 32.0
    else:
        OFFSET: tl.constexpr = 0.0
    return _exact_f32(lo, OFFSET), _exact_f32(hi, OFFSET)


@triton.jit
def _wide_values(q_ptr, q_row, k, mask, QTYPE: tl.constexpr):
    """Q8_0 and float types: element k as fp32 (one byte or more per element, nothing to split)."""
    if QTYPE == _Q8_0:
        b = tl.load(q_ptr + q_row + k, mask=mask, other=0).to(tl.int32)
        # Flipping the sign bit of the int8 gives q + 128 as an unsigned byte.
        val = _exact_f32(b ^ 0x80, 128.0)
    else:
        val = tl.load(q_ptr + q_row + k, mask=mask, other=0.0).to(tl.float32)
    return val


@triton.jit
def _weight_tile(q_ptr, qh_ptr, s_ptr, f_ptr, stride_q, stride_qh, stride_s, stride_f,
                 n, n_ok, k0, K, QTYPE: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k0 : k0 + BLOCK_K] dequantized to fp32 [BLOCK_N, BLOCK_K] (zero outside the matrix)."""
    NSUB: tl.constexpr = BLOCK_K // SUB
    IS_FLOAT: tl.constexpr = (QTYPE == _F32) or (QTYPE == _F16) or (QTYPE == _BF16)
    HAS_BIAS: tl.constexpr = (QTYPE == _Q4_1) or (QTYPE == _Q5_1) or (QTYPE == _Q4_K) or (QTYPE == _Q5_K)
    n2 = n[:, None]
    if IS_FLOAT:
        k = k0 + tl.arange(0, BLOCK_K)
        w = _wide_values(q_ptr, n2 * stride_q, k[None, :], n_ok[:, None] & (k < K)[None, :], QTYPE)
    else:
        sb = tl.arange(0, NSUB)
        ok = n_ok[:, None] & (k0 + sb * SUB < K)[None, :]                             # [BLOCK_N, NSUB]
        mul, bias = _scales(s_ptr, f_ptr, n2 * stride_s, n2 * stride_f, k0 // SUB + sb[None, :], K, ok, QTYPE)
        n3 = n[:, None, None]
        if QTYPE == _Q8_0:
            k = k0 + sb[:, None] * SUB + tl.arange(0, SUB)[None, :]
            q = _wide_values(q_ptr, n3 * stride_q, k[None, :, :], ok[:, :, None], QTYPE)
            w = tl.reshape(q * mul[:, :, None], [n.shape[0], BLOCK_K])
        else:
            lo, hi = _pair_quants(q_ptr, qh_ptr, n3 * stride_q, n3 * stride_qh, k0, sb[None, :, None],
                                  tl.arange(0, SUB // 2)[None, None, :], ok[:, :, None], QTYPE, SUB)
            lo = lo * mul[:, :, None]
            hi = hi * mul[:, :, None]
            if HAS_BIAS:
                lo += bias[:, :, None]
                hi += bias[:, :, None]
            # (element 2j, element 2j + 1) side by side: columns in order.
            w = tl.reshape(tl.join(lo, hi), [n.shape[0], BLOCK_K])
    return w


@triton.jit
def _gemv_step(acc, x_ptr, stride_xm, M, k0, K, q_ptr, qh_ptr, s_ptr, f_ptr,
               stride_q, stride_qh, stride_s, stride_f, n, n_ok,
               QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr, NSUB: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] += x[:, k0 : k0 + SUB*NSUB] @ W[n, same].T: the tile is decoded once for
    all rows, and each scale multiplies a sub-block's dot product rather than each weight."""
    IS_FLOAT: tl.constexpr = (QTYPE == _F32) or (QTYPE == _F16) or (QTYPE == _BF16)
    WIDE: tl.constexpr = IS_FLOAT or (QTYPE == _Q8_0)
    HAS_BIAS: tl.constexpr = (QTYPE == _Q4_1) or (QTYPE == _Q5_1) or (QTYPE == _Q4_K) or (QTYPE == _Q5_K)
    sb = tl.arange(0, NSUB)
    n2 = n[:, None]
    n3 = n[:, None, None]
    rows = tl.arange(0, BLOCK_M)[:, None]
    ok = n_ok[:, None] & (k0 + sb * SUB < K)[None, :]                                 # [BLOCK_N, NSUB]
    if not IS_FLOAT:
        mul, bias = _scales(s_ptr, f_ptr, n2 * stride_s, n2 * stride_f, k0 // SUB + sb[None, :], K, ok, QTYPE)
    if WIDE:
        k = k0 + sb[:, None] * SUB + tl.arange(0, SUB)[None, :]                     # [NSUB, SUB]
        k_ok = k < K
        q = _wide_values(q_ptr, n3 * stride_q, k[None, :, :], n_ok[:, None, None] & k_ok[None, :, :], QTYPE)
    else:
        j = tl.arange(0, SUB // 2)
        k = k0 + sb[:, None] * SUB + 2 * j[None, :]                                   # even elements
        k_ok = k < K
        q_even, q_odd = _pair_quants(q_ptr, qh_ptr, n3 * stride_q, n3 * stride_qh, k0, sb[None, :, None],
                                     j[None, None, :], ok[:, :, None], QTYPE, SUB)  # [BLOCK_N, NSUB, SUB/2]
    for m in tl.static_range(BLOCK_M):
        # Rows past M re-read row M-1; their sums are never stored.
        x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm
        if WIDE:
            xm = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            dots = tl.sum(q * xm[None, :, :], axis=2)
        else:
            x_even = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + k + 1, mask=k_ok, other=0.0).to(tl.float32)
            dots = tl.sum(q_even * x_even[None, :, :] + q_odd * x_odd[None, :, :], axis=2)
            if HAS_BIAS:
                xsum = tl.sum(x_even + x_odd, axis=1)
        if IS_FLOAT:
            part = tl.sum(dots, axis=1)
        elif HAS_BIAS:
            part = tl.sum(dots * mul + bias * xsum[None, :], axis=1)
        else:
            part = tl.sum(dots * mul, axis=1)
        if BLOCK_M == 1:
            acc += part[None, :]
        else:
            acc += tl.where(rows == m, part[None, :], 0.0)
    return acc


@triton.jit
def _qgemv_kernel(x_ptr, y_ptr, q_ptr, qh_ptr, s_ptr, f_ptr,
                  M, N, K, stride_xm, stride_ym, stride_ysplit,
                  stride_q, stride_qh, stride_s, stride_f,
                  SPLIT_K, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SUB: tl.constexpr, NSUB: tl.constexpr):
    """y[:M, n-block] (or split pid_k's fp32 partial) for M <= BLOCK_M rows of x; K steps of SUB * NSUB."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BK: tl.constexpr = SUB * NSUB
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    per_split = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    k_lo = pid_k * per_split
    k_hi = tl.minimum(K, k_lo + per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        acc = _gemv_step(acc, x_ptr, stride_xm, M, k0, K, q_ptr, qh_ptr, s_ptr, f_ptr,
                         stride_q, stride_qh, stride_s, stride_f, n, n_ok, QTYPE, BLOCK_M, SUB, NSUB)
    rows = tl.arange(0, BLOCK_M)[:, None]
    out = y_ptr + pid_k * stride_ysplit + rows * stride_ym + n[None, :]
    tl.store(out, _cast(acc, y_ptr.dtype.element_ty), mask=(rows < M) & n_ok[None, :])


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row tiles share each column tile's weights while they sit in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_here
    pid_n = (pid % per_group) // rows_here
    return pid_m, pid_n


@triton.jit
def _dot(x, w, acc):
    """acc += x @ w.T with w first rounded to x's dtype, as the tensor cores take it.

    fp32 x runs an IEEE fp32 dot (TF32 would cost ~1e-3 relative). So do 16-bit x under
    the CPU interpreter, whose dot cannot multiply bfloat16: a product of two 16-bit
    floats is exact in fp32, so that matches the tensor-core dot up to the order of the sum.
    """
    w = _cast(w, x.dtype)
    if (x.dtype == tl.float32) or _INTERPRETED:
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _qgemm_kernel(x_ptr, y_ptr, q_ptr, qh_ptr, s_ptr, f_ptr,
                  M, N, K, stride_xm, stride_ym, stride_ysplit,
                  stride_q, stride_qh, stride_s, stride_f,
                  SPLIT_K, QTYPE: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * per_split
    k_hi = tl.minimum(K, k_lo + per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        w = _weight_tile(q_ptr, qh_ptr, s_ptr, f_ptr, stride_q, stride_qh, stride_s, stride_f,
                         n, n_ok, k0, K, QTYPE, SUB, BLOCK_K)
        acc = _dot(x, w, acc)
    out = y_ptr + pid_k * stride_ysplit + m[:, None] * stride_ym + n[None, :]
    tl.store(out, _cast(acc, y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- launch

# Rows of x up to which the GEMV kernel runs (see the module docstring).
GEMV_MAX_M = 4

# Elements per sub-block: the granularity of the integer/fp16 scales.
SUB_BLOCK = {GGMLType.Q6_K: 16, GGMLType.F32: 32, GGMLType.F16: 32, GGMLType.BF16: 32}


def sub_block(qtype: GGMLType) -> int:
    return SUB_BLOCK.get(qtype, 32)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 256
    split_k: int | None = None        # None: chosen from the grid size
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int | None = None        # None: chosen from the grid size


def gemv_config(m: int) -> GemvConfig:
    """Rows per program for the GEMV: fewer when each decoded weight serves several rows of x."""
    return GemvConfig(block_n=32 if m == 1 else 16)


def gemm_config(m: int, dtype: torch.dtype) -> GemmConfig:
    """Tile shape for the tiled path by rows of x and activation dtype (GPU tuning still to do)."""
    if dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units: smaller tiles keep the accumulators in registers.
        return GemmConfig(32, 64, 32, num_warps=4, num_stages=2)
    if m <= 16:
        return GemmConfig(16, 64, 128, num_warps=4, num_stages=3)
    if m <= 64:
        return GemmConfig(64, 64, 64, num_warps=4, num_stages=3)
    return GemmConfig(128, 128, 64, num_warps=8, num_stages=3)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _split_k(programs: int, k_steps: int, device: torch.device) -> int:
    """Slices of K so that small outputs (o_proj, down: 2048 rows) still give every SM a few programs."""
    want = 4 * _sm_count(device)
    if programs >= want:
        return 1
    return max(1, min(8, want // programs, k_steps // 2))


def _segments(w: Packed) -> list[tuple[int, PackedTensor]]:
    """(first output row, part) for each part of a packed weight."""
    parts = w.parts if isinstance(w, PackedWeight) else (w,)
    out, row = [], 0
    for p in parts:
        out.append((row, p))
        row += p.shape[0]
    return out


def _plane_args(p: PackedTensor) -> tuple[list[torch.Tensor], list[int]]:
    """Pointers and row strides of the four planes; an absent plane is stood in for by q (never read)."""
    ptrs, strides = [], []
    for plane in p.planes:
        ptrs.append(p.q if plane is None else plane)
        strides.append(0 if plane is None else plane.stride(0))
    return ptrs, strides


def check_input(x: torch.Tensor, w: Packed, what: str) -> None:
    if x.dim() != 2:
        raise KernelInputError(f"{what}: x must be 2-D [M, K], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelInputError(f"{what}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] != w.shape[1]:
        raise KernelInputError(f"{what}: x has {x.shape[1]} columns but the weight {list(w.shape)} "
                               f"expects {w.shape[1]}")
    if x.device != w.device:
        raise KernelInputError(f"{what}: x is on {x.device} but the weight is on {w.device}")


def _launch(x: torch.Tensor, y: torch.Tensor, p: PackedTensor, col0: int, split: int,
            path: str, cfg: GemvConfig | GemmConfig) -> None:
    """One part's output columns [col0, col0 + N): into y (split == 1) or into fp32 partials y[split]."""
    M, K = x.shape
    N = p.shape[0]
    (q, qh, s, f), (sq, sqh, ss, sf) = _plane_args(p)
    out = y[..., col0:col0 + N]
    split_stride = y.stride(0) if split > 1 else 0
    if path == "gemv":
        block_m = triton.next_power_of_2(M)
        grid = (triton.cdiv(N, cfg.block_n), split)
        _qgemv_kernel[grid](x, out, q, qh, s, f, M, N, K, x.stride(0), out.stride(-2), split_stride,
                            sq, sqh, ss, sf, split, QTYPE=int(p.qtype), BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                            SUB=sub_block(p.qtype), NSUB=cfg.block_k // sub_block(p.qtype),
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
        _qgemm_kernel[grid](x, out, q, qh, s, f, M, N, K, x.stride(0), out.stride(-2), split_stride,
                            sq, sqh, ss, sf, split, QTYPE=int(p.qtype), SUB=sub_block(p.qtype),
                            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def qmatmul_triton(x: torch.Tensor, w: Weight | Packed, *,
                   config: GemvConfig | GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype, fp32 accumulation; same semantics as qmatmul_torch.

    `w` should come from `prepare_weight` (done once at load); a raw QuantTensor or
    SegmentedTensor is packed on first use and the packing kept while it lives.
    Each part of a mixed-type weight writes its own columns of one output.
    `config` overrides the path and tiles (tests, tuning).
    """
    w = packed(w)
    check_input(x, w, "qmatmul")
    M, K = x.shape
    N = w.shape[0]
    if M == 0:
        return x.new_empty(0, N)
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:
        config = gemv_config(M) if M <= GEMV_MAX_M else gemm_config(M, x.dtype)
    path = "gemv" if isinstance(config, GemvConfig) else "gemm"
    if path == "gemv" and M > GEMV_MAX_M:
        raise KernelInputError(f"qmatmul: the GEMV path takes at most {GEMV_MAX_M} rows, got {M}")
    block_k = config.block_k
    if config.split_k is not None:
        split = config.split_k
    else:
        tiles = triton.cdiv(N, config.block_n)
        if path == "gemm":
            tiles *= triton.cdiv(M, config.block_m)
        split = _split_k(tiles, triton.cdiv(K, block_k), x.device)
    # Split-K slices write fp32 partials, summed here (deterministic, unlike atomics).
    shape = (split, M, N) if split > 1 else (M, N)
    y = torch.empty(shape, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    for col0, p in _segments(w):
        _launch(x, y, p, col0, split, path, config)
    return y.sum(0).to(x.dtype) if split > 1 else y
