"""SwiGLU on a fused gate+up projection: silu(x @ Wg.T) * (x @ Wu.T).

The fused weight stacks gate rows then up rows ([2 * I, K]).

Triton path (`gate_up_swiglu_triton`): one launch of the matmul kernels of
kernels/qmatmul.py in their PAIRED form: unit u computes gate tile u and up tile u with
the matmul's own arithmetic (so each of gate and up is bitwise what qmatmul_triton gives
for those rows) and writes silu(gate) * up in fp32, rounded once to x's dtype; the
[M, 2I] intermediate never reaches memory (decode keeps it as fp32 split-K partials).
Gate and up may be of different types (a part each of a TiledWeight).
"""
from __future__ import annotations

import torch
import triton

from ..errors import KernelInputError
from ..gguf.tensors import Weight
from .fusions import SWIGLU
from .qmatmul import BLOCK_N, check_input, launch, qmatmul_torch, slice_groups, sm_count
from .qtiles import Tiled, TiledTensor, segments, tiled


def gate_up_swiglu_torch(x: torch.Tensor, w_gate_up: Weight) -> torch.Tensor:
    """x [M, K] -> [M, I]; the activation is computed in fp32."""
    gu = qmatmul_torch(x.float(), w_gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def _gate_up_pieces(w: Tiled) -> list[tuple[int, int, TiledTensor, TiledTensor]]:
    """Output columns [a, b) with the gate rows [a, b) and up rows [I + a, I + b) each inside one part.

    Part boundaries of the gate half and of the up half (shifted by I) cut the range; each
    piece is one launch, with views into the parts (no copy). A fused weight of one type,
    or of a gate part and an up part, is one piece.
    """
    rows = w.shape[0]
    if rows % 2:
        raise KernelInputError(f"gate_up_swiglu: the fused weight {list(w.shape)} has an odd number of rows; "
                               f"expected gate rows then as many up rows")
    inter = rows // 2
    segs = segments(w)
    cuts = {0, inter}
    for start, p in segs:
        for edge in (start, start + p.shape[0]):
            cuts.add(edge if edge <= inter else edge - inter)
    cuts = sorted(c for c in cuts if 0 <= c <= inter)

    def view(row0: int, row1: int) -> TiledTensor:
        for start, p in segs:
            if start <= row0 and row1 <= start + p.shape[0]:
                return p if (row0, row1) == (start, start + p.shape[0]) else p.rows(row0 - start, row1 - start)
        raise AssertionError("cuts include every part boundary")

    return [(a, b, view(a, b), view(inter + a, inter + b)) for a, b in zip(cuts, cuts[1:])]


def gate_up_swiglu_triton(x: torch.Tensor, w_gate_up: Weight | Tiled, *, norm: tuple | None = None) -> torch.Tensor:
    """x [M, K] -> silu(x @ Wg.T) * (x @ Wu.T) [M, I] in x's dtype; same semantics as
    gate_up_swiglu_torch. With norm = (inv_rms [M], weight [K]), x is first RMSNorm(x)
    (kernels/fusions.py). `w_gate_up` should come from prepare_tiles (once at load)."""
    w = tiled(w_gate_up)
    check_input(x, w, "gate_up_swiglu")
    pieces = _gate_up_pieces(w)
    M, K = x.shape
    inter = w.shape[0] // 2
    y = torch.empty(M, inter, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    groups = slice_groups(K, triton.cdiv(inter, BLOCK_N), sm_count(x.device))
    for a, b, gate, up in pieces:
        out = y[:, a:b]
        launch(x, gate, up, groups, SWIGLU, (out, out.stride(0)), norm=norm)
    return y
