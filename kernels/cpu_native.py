"""The cpu backend on the compiled kernels (`smollm3_triton._cpu`, csrc/cpu/), where they
were built (Linux x86-64 with AVX2; `pip install` builds them): fewer, larger ops than
torch's, on a thread pool that behaves on a shared machine.

- matmuls: GGUF's 4/5/6/8-bit types in a layout packed once at load (csrc/cpu/qgemm.h);
  activations rounded to int16 per 32 elements, int32 dot products, fp32 scales and sums;
  gate/up with SwiGLU in one pass.
- RMSNorm with the residual add; RoPE with the K/V cache write; attention straight from
  the paged cache (fp32, fp16 or bf16), every query row against the keys up to its own
  position (a prompt's rows too), so a row's result does not depend on the batch or on
  how its prompt was chunked.
- threads: torch.get_num_threads() (Runtime.load's `threads=`), on the extension's own
  pool (csrc/cpu/pool.h), not OpenMP's.

Anything the kernels do not take (float weight matrices, a compute dtype other than fp32,
a head size not a multiple of 8) goes to the torch ops of kernels/cpu_fast.py; so does
everything when the extension is missing (`AVAILABLE` is False).

Numerics: against the exact path (backend "torch"), each matmul's only rounding beyond
fp32 is the activations' int16 step (2^-16 of a group's largest magnitude): a relative
error ~1e-5, where cpu_fast's bf16 inputs give ~3e-3 (tests/test_cpu_native.py).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch

from ..gguf.constants import GGMLType
from ..gguf.tensors import QuantTensor, SegmentedTensor
from . import cpu_fast
from .rms_norm import rms_norm_torch

try:
    from .. import _cpu
except ImportError:          # not built here (another platform, no compiler): torch's ops serve
    _cpu = None

AVAILABLE = _cpu is not None
KINDS = {GGMLType.Q4_0: 0, GGMLType.Q4_1: 1, GGMLType.Q5_0: 2, GGMLType.Q5_1: 3, GGMLType.Q8_0: 4,
         GGMLType.Q4_K: 5, GGMLType.Q5_K: 6, GGMLType.Q6_K: 7}
KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True)
class NativeWeight:
    """A matrix packed for the kernels: row segments of one GGUF type each. Its rows
    dequantize back to GGUF's exact values (embedding lookups of a tied LM head), so the
    GGUF tensor itself need not be kept."""
    handle: object                       # the C matrix (a capsule); points into `packed`
    packed: tuple[torch.Tensor, ...]
    shape: tuple[int, int]

    def dequantize_rows(self, rows: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = torch.arange(self.shape[0]) if rows is None else rows.to(torch.int64).contiguous()
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        out = torch.empty((rows.numel(), self.shape[1]), dtype=torch.float32)
        _cpu.dequant_rows(self.handle, rows.data_ptr(), rows.numel(), out.data_ptr())
        return out.view(*rows.shape, self.shape[1]).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(None, dtype)


HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 buffer that starts on a 2 MB boundary, its whole 2 MB pages given to
    the kernel's transparent huge pages (madvise; a buffer under 2 MB, or THP off: 4 KB pages).
    A decode step streams every weight once: on 4 KB pages the hardware prefetchers stop at
    each page's end and the TLB misses every 4 KB. Measured on the 3B-shaped file's gate/up
    (8 layers, 208 MB, M = 1, 1 thread, load 3.8-3.9): 12.3-13.6 -> 21.9-22.3 GB per CPU second."""
    if nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8)
    # A fresh private anonymous mapping, not torch.empty: malloc may hand back heap memory already
    # written (4 KB pages stay 4 KB), as it did in a long test session once glibc had raised its
    # mmap threshold; and mmap's default MAP_SHARED is shmem, which THP skips. The tensor holds
    # the mapping; it is unmapped when the last view goes.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(region, dtype=torch.uint8)
    skip = -base.data_ptr() % HUGE_PAGE
    out = base[skip:skip + nbytes]            # a view: keeps `base` alive
    _cpu.advise_huge(out.data_ptr(), nbytes)
    return out


def _pack(w: QuantTensor) -> torch.Tensor:
    """w's GGUF blocks in the kernels' layout (csrc/cpu/qgemm.h), decoded in C."""
    kind, (n, k) = KINDS[w.qtype], w.shape
    out = huge_page_buffer(n * _cpu.plan(kind, k) + 64)     # + 64: vector loads overrun
    data = w.data.contiguous()
    _cpu.pack_gguf(kind, n, k, data.data_ptr(), data.shape[1], out.data_ptr())
    return out


def prepare(w: QuantTensor | SegmentedTensor):
    """One matrix for the ops: packed for the kernels, or cpu_fast's form where they do not take it."""
    parts = w.parts if isinstance(w, SegmentedTensor) else (w,)
    if _cpu is None or any(p.qtype not in KINDS or _cpu.plan(KINDS[p.qtype], p.shape[1]) < 0 for p in parts):
        return cpu_fast.prepare(w)
    packed = tuple(_pack(p) for p in parts)
    args = [w.shape[1]]
    for p, buf in zip(parts, packed):
        args += [KINDS[p.qtype], p.shape[0], buf.data_ptr()]
    return NativeWeight(_cpu.matrix(*args), packed, w.shape)


# ---------------------------------------------------------------- ops (the torch references' contracts)

# The backend runs these only for a float32 model (backends.get_backend); a matrix the
# kernels do not take is cpu_fast's and goes to its ops.

def qmatmul(x: torch.Tensor, w) -> torch.Tensor:
    if not isinstance(w, NativeWeight):
        return cpu_fast.qmatmul_cpu(x, w)
    return _matmul(x, w, None)


def add_matmul(x: torch.Tensor, w, h: torch.Tensor, eps: float) -> tuple[torch.Tensor, None]:
    """(h + x @ w.T, no stats): the residual add inside the matmul's tasks. A torch add of a
    prompt's rows would be an OpenMP region of torch's own threads, which on a busy machine
    waits for a descheduled thread and, at libgomp's default spin (torch imported before
    us), spins beside our pool's threads through the next matmul."""
    if not isinstance(w, NativeWeight) or h.dtype != torch.float32 or h.shape != (x.shape[0], w.shape[0]):
        return h + qmatmul(x, w), None
    return _matmul(x, w, h.contiguous()), None


def _matmul(x: torch.Tensor, w: NativeWeight, residual: torch.Tensor | None) -> torch.Tensor:
    x = x.contiguous()
    m, n = x.shape[0], w.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    _cpu.matmul(w.handle, x.data_ptr(), x.shape[1], m, y.data_ptr(), n, 0 if residual is None else residual.data_ptr(),
                torch.get_num_threads())
    return y


def gate_up_swiglu(x: torch.Tensor, w) -> torch.Tensor:
    if not isinstance(w, NativeWeight):
        return cpu_fast.gate_up_swiglu_cpu(x, w)
    x = x.contiguous()
    m, n = x.shape[0], w.shape[0] // 2
    h = torch.empty((m, n), dtype=torch.float32)
    _cpu.gate_up_swiglu(w.handle, x.data_ptr(), x.shape[1], m, h.data_ptr(), n, torch.get_num_threads())
    return h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_contiguous() or \
            (residual is not None and (residual.dtype != torch.float32 or not residual.is_contiguous())):
        return rms_norm_torch(x, weight, eps, residual)
    y = torch.empty_like(x)
    h = x if residual is None else torch.empty_like(x)
    _cpu.rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
                  x.shape[0], x.shape[1], y.data_ptr(), h.data_ptr())
    return y, h


def rope_qkv(x: torch.Tensor, w_qkv, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool) -> torch.Tensor:
    qkv = qmatmul(x, w_qkv).float()
    if k_cache.dtype not in KV_DTYPES or not (k_cache.is_contiguous() and v_cache.is_contiguous()) \
            or positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64 or head_dim % 2 \
            or cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        return cpu_fast.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, n_heads,
                                      n_kv_heads, head_dim, use_rope)
    T = x.shape[0]
    q = torch.empty((T, n_heads, head_dim), dtype=torch.float32)
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    bad = _cpu.rope_kv(qkv.data_ptr(), T, positions.data_ptr(), slot_mapping.data_ptr(), cos.data_ptr(),
                       sin.data_ptr(), cos.shape[0], n_heads, n_kv_heads, head_dim, int(use_rope), k_cache.data_ptr(),
                       v_cache.data_ptr(), KV_DTYPES[k_cache.dtype], k_cache.shape[0] * k_cache.shape[2],
                       k_cache.shape[2], q.data_ptr())
    if bad >= 0:
        raise IndexError(f"token {bad}: position {int(positions[bad])} is outside the RoPE tables "
                         f"({cos.shape[0]}) or slot {int(slot_mapping[bad])} outside the KV pool")
    return q


@dataclass(frozen=True)
class _AttentionPlan:
    """Every query row of a step as the kernel reads them: its row, the keys it sees (its
    position + 1: a prompt's rows causally) and its sequence's row of the block tables."""
    rows: torch.Tensor           # int64 [E]
    lens: torch.Tensor           # int32 [E]
    table_index: torch.Tensor    # int32 [E]
    tables: torch.Tensor         # int32 [B, max_blocks], contiguous


def _attention_plan(query_start, seq_lens, block_tables) -> _AttentionPlan:
    starts, lens = query_start.tolist(), seq_lens.tolist()
    rows, keys, index = [], [], []
    for b, n in enumerate(lens):
        n_q = starts[b + 1] - starts[b]
        if n == 0:
            continue
        rows += range(starts[b], starts[b + 1])
        keys += range(n - n_q + 1, n + 1)
        index += [b] * n_q
    return _AttentionPlan(torch.tensor(rows, dtype=torch.int64), torch.tensor(keys, dtype=torch.int32),
                          torch.tensor(index, dtype=torch.int32), block_tables.to(torch.int32).contiguous())


_plan_step = cpu_fast._PerStep(_attention_plan)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start: torch.Tensor,
              seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int, scale: float) -> torch.Tensor:
    """attention_torch's contract: each query row against the keys up to its position."""
    N, H, D = q.shape
    if q.dtype != torch.float32 or k_cache.dtype not in KV_DTYPES or D % 8 or H // k_cache.shape[1] > 16 \
            or D > 256 or not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return cpu_fast.attention_cpu(q, k_cache, v_cache, query_start, seq_lens, block_tables, max_query_len, scale)
    plan = _plan_step((query_start, seq_lens, block_tables))
    out = torch.empty_like(q) if len(plan.rows) == N else torch.zeros_like(q)    # rows of idle sequences: 0
    if len(plan.rows):
        _cpu.attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), KV_DTYPES[k_cache.dtype],
                       k_cache.shape[2], H, k_cache.shape[1], D, len(plan.rows), plan.tables.data_ptr(),
                       plan.tables.shape[1], plan.table_index.data_ptr(), plan.lens.data_ptr(), plan.rows.data_ptr(),
                       scale, out.data_ptr(), torch.get_num_threads())
    return out
