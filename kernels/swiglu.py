"""SwiGLU on a fused gate+up projection: silu(x @ Wg.T) * (x @ Wu.T).

The fused weight stacks gate rows then up rows ([2 * I, K]).

Triton path (`gate_up_swiglu_triton`): the activation is the epilogue of the
gate+up matmul. Each program computes the same output columns of gate and of
up (from the GEMV or the tiled kernel of kernels/qmatmul.py, whose decoding
helpers it calls), so the [M, 2I] intermediate never reaches memory. Gate and
up may be of different types (a Q4_K_M file may hold them as separate parts of
a PackedWeight): the kernel takes one type per half.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from ..gguf.tensors import Weight
from .qmatmul import (
    GEMV_MAX_M,
    GemmConfig,
    GemvConfig,
    _cast,
    _dot,
    _gemv_step,
    _plane_args,
    _segments,
    _tile_ids,
    _weight_tile,
    check_input,
    gemm_config,
    gemv_config,
    qmatmul_torch,
    sub_block,
)
from .repack import Packed, PackedTensor, packed


def gate_up_swiglu_torch(x: torch.Tensor, w_gate_up: Weight) -> torch.Tensor:
    """x [M, K] -> [M, I]; the activation is computed in fp32."""
    gu = qmatmul_torch(x.float(), w_gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@triton.jit
def _swiglu(gate, up):
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _gate_up_gemv_kernel(x_ptr, y_ptr,
                         gq_ptr, gqh_ptr, gs_ptr, gf_ptr, uq_ptr, uqh_ptr, us_ptr, uf_ptr,
                         M, N, K, stride_xm, stride_ym,
                         g_stride_q, g_stride_qh, g_stride_s, g_stride_f,
                         u_stride_q, u_stride_qh, u_stride_s, u_stride_f,
                         QTYPE_G: tl.constexpr, QTYPE_U: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SUB_G: tl.constexpr, SUB_U: tl.constexpr):
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc_g = _gemv_step(acc_g, x_ptr, stride_xm, M, k0, K, gq_ptr, gqh_ptr, gs_ptr, gf_ptr,
                           g_stride_q, g_stride_qh, g_stride_s, g_stride_f, n, n_ok,
                           QTYPE_G, BLOCK_M, SUB_G, BLOCK_K // SUB_G)
        acc_u = _gemv_step(acc_u, x_ptr, stride_xm, M, k0, K, uq_ptr, uqh_ptr, us_ptr, uf_ptr,
                           u_stride_q, u_stride_qh, u_stride_s, u_stride_f, n, n_ok,
                           QTYPE_U, BLOCK_M, SUB_U, BLOCK_K // SUB_U)
    rows = tl.arange(0, BLOCK_M)[:, None]
    out = y_ptr + rows * stride_ym + n[None, :]
    tl.store(out, _cast(_swiglu(acc_g, acc_u), y_ptr.dtype.element_ty), mask=(rows < M) & n_ok[None, :])


@triton.jit
def _gate_up_gemm_kernel(x_ptr, y_ptr,
                         gq_ptr, gqh_ptr, gs_ptr, gf_ptr, uq_ptr, uqh_ptr, us_ptr, uf_ptr,
                         M, N, K, stride_xm, stride_ym,
                         g_stride_q, g_stride_qh, g_stride_s, g_stride_f,
                         u_stride_q, u_stride_qh, u_stride_s, u_stride_f,
                         QTYPE_G: tl.constexpr, QTYPE_U: tl.constexpr, SUB_G: tl.constexpr,
                         SUB_U: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        wg = _weight_tile(gq_ptr, gqh_ptr, gs_ptr, gf_ptr, g_stride_q, g_stride_qh, g_stride_s, g_stride_f,
                          n, n_ok, k0, K, QTYPE_G, SUB_G, BLOCK_K)
        acc_g = _dot(x, wg, acc_g)
        wu = _weight_tile(uq_ptr, uqh_ptr, us_ptr, uf_ptr, u_stride_q, u_stride_qh, u_stride_s, u_stride_f,
                          n, n_ok, k0, K, QTYPE_U, SUB_U, BLOCK_K)
        acc_u = _dot(x, wu, acc_u)
    out = y_ptr + m[:, None] * stride_ym + n[None, :]
    tl.store(out, _cast(_swiglu(acc_g, acc_u), y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def swiglu_gemm_config(m: int, dtype: torch.dtype) -> GemmConfig:
    """Tiles for the fused kernel: two fp32 accumulators share the registers, so the largest
    tiles of qmatmul's gemm_config are reshaped to fit sm_80 without spills."""
    if dtype == torch.float32:
        return GemmConfig(32, 32, 32, num_warps=8, num_stages=2)
    if m <= 64:
        return gemm_config(m, dtype)
    return GemmConfig(64, 128, 64, num_warps=8, num_stages=3)


def _gate_up_pieces(w: Packed) -> list[tuple[int, int, PackedTensor, PackedTensor]]:
    """Output columns [a, b) with the gate rows [a, b) and up rows [I + a, I + b) each inside one part.

    Part boundaries of the gate half and of the up half (shifted by I) cut the
    range; each piece is one launch, with views into the parts (no copy).
    """
    rows = w.shape[0]
    if rows % 2:
        raise KernelInputError(f"gate_up_swiglu: the fused weight {list(w.shape)} has an odd number of rows; "
                               f"expected gate rows then as many up rows")
    inter = rows // 2
    segs = _segments(w)
    cuts = {0, inter}
    for start, p in segs:
        for edge in (start, start + p.shape[0]):
            cuts.add(edge if edge <= inter else edge - inter)
    cuts = sorted(c for c in cuts if 0 <= c <= inter)

    def view(row0: int, row1: int) -> PackedTensor:
        for start, p in segs:
            if start <= row0 and row1 <= start + p.shape[0]:
                return p.rows(row0 - start, row1 - start)
        raise AssertionError("cuts include every part boundary")

    return [(a, b, view(a, b), view(inter + a, inter + b)) for a, b in zip(cuts, cuts[1:])]


def gate_up_swiglu_triton(x: torch.Tensor, w_gate_up: Weight | Packed, *,
                          config: GemvConfig | GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] -> silu(x @ Wg.T) * (x @ Wu.T) [M, I] in x's dtype; same semantics as gate_up_swiglu_torch.

    `w_gate_up` should come from `prepare_weight` (once at load). `config` overrides
    the path and tiles (tests, tuning); split-K does not apply (the activation needs whole sums).
    """
    w = packed(w_gate_up)
    check_input(x, w, "gate_up_swiglu")
    pieces = _gate_up_pieces(w)
    M, K = x.shape
    inter = w.shape[0] // 2
    y = torch.empty(M, inter, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:
        config = gemv_config(M) if M <= GEMV_MAX_M else swiglu_gemm_config(M, x.dtype)
    if isinstance(config, GemvConfig) and M > GEMV_MAX_M:
        raise KernelInputError(f"gate_up_swiglu: the GEMV path takes at most {GEMV_MAX_M} rows, got {M}")
    for a, b, gate, up in pieces:
        (gq, gqh, gs, gf), (gsq, gsqh, gss, gsf) = _plane_args(gate)
        (uq, uqh, us, uf), (usq, usqh, uss, usf) = _plane_args(up)
        out = y[:, a:b]
        N = b - a
        args = (x, out, gq, gqh, gs, gf, uq, uqh, us, uf, M, N, K, x.stride(0), out.stride(0),
                gsq, gsqh, gss, gsf, usq, usqh, uss, usf)
        types = dict(QTYPE_G=int(gate.qtype), QTYPE_U=int(up.qtype))
        if isinstance(config, GemvConfig):
            _gate_up_gemv_kernel[(triton.cdiv(N, config.block_n),)](
                *args, **types, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, SUB_G=sub_block(gate.qtype), SUB_U=sub_block(up.qtype),
                num_warps=config.num_warps, num_stages=config.num_stages)
        else:
            grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
            _gate_up_gemm_kernel[grid](
                *args, **types, SUB_G=sub_block(gate.qtype), SUB_U=sub_block(up.qtype),
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                num_warps=config.num_warps, num_stages=config.num_stages)
    return y
