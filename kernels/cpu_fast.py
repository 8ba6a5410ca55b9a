"""The fast CPU op set (backend "cpu"): weights stay 4-bit in memory, matmuls run on
torch's CPU int4 weight-only kernel, attention on torch's fused SDPA.

Why: decode on a CPU is bound by the bytes read per token. The exact path (backend
"torch") reads every weight as fp32, 8x the bytes of a Q4 block; here a weight costs
half a byte (plus a bf16 scale and zero per 32 elements).

Weights (`CpuWeight`, built once at load by `prepare_weights`): every 32-element
group of a GGUF weight is `int * mul + bias` (repack's int_values / affine). The
kernel `_weight_int4pack_mm_for_cpu` computes with `(q - 8) * scale + zero`, q in
0..15, one (scale, zero) per group of 32. A 4-bit type (Q4_0, Q4_1, Q4_K) is one
such int4 plane: q = int, scale = mul, zero = bias + 8 * mul. A wider type (Q5_0,
Q5_1, Q5_K, Q8_0) is split as int = lo + 16 * hi into two planes whose products
add up: lo (scale mul, zero bias + 8 * mul) and hi + 8 (scale 16 * mul, zero 0).
Q6_K (16-element sub-blocks, a group size the kernel does not take) is kept as a
dense bf16 matrix; F32/F16/BF16 weights as fp32, computed exactly as the reference.

What is not exact (measured against the exact path in tests/test_cpu_fast.py and on
the real model in bench/cpu_fast_kld.py): the kernel takes bf16 activations, bf16
scales and zeros, and writes bf16; it accumulates in fp32. The residual stream, the
norms, RoPE, the KV cache and attention stay in the model's dtype (fp32 by default).

Batch invariance: the int4 kernel computes each row the same way whatever the row
count (tested), and attention runs each sequence on its own keys, so a token's
result does not depend on the batch it is in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..gguf.constants import FLOAT_DTYPES, GGMLType
from ..gguf.tensors import QuantTensor, SegmentedTensor
from .qmatmul import qmatmul_torch
from .repack import prepare_weight

GROUP = 32
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
# Query rows per SDPA call of a prompt: bounds the [rows, keys] mask of a long prompt.
QUERY_TILE = 512
# SDPA on the CPU walks keys in blocks of min(512, keys), with vectorised sums over each:
# a prompt's keys are padded (masked) to whole blocks of 512, so a query's sums run over
# the same blocks whatever the chunk it is computed in (batch invariance). Decode rows
# read exactly their own keys, which depend on nothing else either.
KEY_BLOCK = 512
# Up to this many tokens a step writes its K/V rows with one copy each, not a scatter.
FEW_SLOTS = 4


@dataclass(frozen=True)
class Int4Plane:
    packed: torch.Tensor         # [N, K / 2] uint8, _convert_weight_to_int4pack_for_cpu's layout
    scales_zeros: torch.Tensor   # [K / 32, N, 2] bfloat16


@dataclass(frozen=True)
class CpuTensor:
    """One weight of one type: int4 planes whose products add up, or a dense matrix."""
    shape: tuple[int, int]
    planes: tuple[Int4Plane, ...] = ()
    dense: torch.Tensor | None = None

    def matmul(self, x_bf16: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (and its bf16 copy) -> [M, N]."""
        if self.dense is None:
            y = _INT4_MM(x_bf16, self.planes[0].packed, GROUP, self.planes[0].scales_zeros)
            for p in self.planes[1:]:       # summed in fp32: one bf16 rounding per plane, not another
                y = y.float() + _INT4_MM(x_bf16, p.packed, GROUP, p.scales_zeros)
            return y if y.shape[1] == self.shape[0] else y[:, :self.shape[0]]
        if self.dense.dtype == torch.bfloat16:
            return x_bf16 @ self.dense.T
        return qmatmul_torch(x, QuantTensor(self.dense, GGMLType.F32, self.shape))


@dataclass(frozen=True)
class CpuWeight:
    """A model matrix on the fast CPU path: row segments (one per GGUF type of a fused
    weight), and the GGUF tensor itself for embedding-row lookups."""
    segments: tuple[CpuTensor, ...]
    source: QuantTensor | SegmentedTensor

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(s.shape[0] for s in self.segments), self.segments[0].shape[1])

    def dequantize_rows(self, rows: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.source.dequantize_rows(rows, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.source.dequantize(dtype)


def _int4_plane(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Plane:
    """q [N, K] in 0..15; scale, zero [N, K / 32] fp32. The kernel wants N a multiple of
    16: padding rows (scale and zero 0) give zero columns, cut off after the call."""
    pad = -q.shape[0] % 16
    q, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (q, scale, zero))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack((scale.T, zero.T), dim=-1).to(torch.bfloat16).contiguous()
    return Int4Plane(packed, sz)


_FOUR_BIT = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)
_SPLIT = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q8_0)


def prepare_tensor(w: QuantTensor) -> CpuTensor:
    if w.qtype in FLOAT_DTYPES:
        return CpuTensor(w.shape, dense=w.dequantize(torch.float32).contiguous())
    p = prepare_weight(w)
    if w.qtype == GGMLType.Q6_K:
        return CpuTensor(w.shape, dense=p.dequantize(torch.bfloat16).contiguous())
    if w.qtype not in _FOUR_BIT + _SPLIT:
        raise UnsupportedModelError(f"backend 'cpu' has no layout for {w.qtype.name} weights")
    v, (mul, bias) = p.int_values(), p.affine()
    lo = _int4_plane(v & 15, mul, bias + 8 * mul)
    if w.qtype in _FOUR_BIT:
        return CpuTensor(w.shape, planes=(lo,))
    return CpuTensor(w.shape, planes=(lo, _int4_plane((v >> 4) + 8, 16 * mul, torch.zeros_like(mul))))


def prepare(w: QuantTensor | SegmentedTensor) -> CpuWeight:
    parts = w.parts if isinstance(w, SegmentedTensor) else (w,)
    return CpuWeight(tuple(prepare_tensor(p) for p in parts), w)


# ---------------------------------------------------------------- ops

def qmatmul_cpu(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype."""
    xb = x.to(torch.bfloat16)
    ys = [s.matmul(xb, x) for s in w.segments]
    return (ys[0] if len(ys) == 1 else torch.cat([y.to(x.dtype) for y in ys], dim=1)).to(x.dtype)


def gate_up_swiglu_cpu(x: torch.Tensor, w_gate_up: CpuWeight) -> torch.Tensor:
    gate, up = qmatmul_cpu(x.float(), w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


class _PerStep:
    """Tables every layer of one forward shares (RoPE rows, KV slots, attention plans),
    built at the first layer and reused while the step's tensors are the same objects
    holding the same values (a copy is kept to compare: inference tensors carry no
    version counter). `consts` (the RoPE tables, the block size) match by identity or
    equality. One entry: a forward runs its layers in order."""

    def __init__(self, build):
        self.build, self.entry = build, None

    def __call__(self, step: tuple[torch.Tensor, ...], *consts):
        entry = self.entry          # read once: another thread may replace it meanwhile
        if entry is not None and all(a is b and torch.equal(c, b) for a, c, b in zip(*entry[0], step)) and \
                all(x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(entry[1], consts)):
            return entry[2]
        value = self.build(*step, *consts)
        self.entry = ((step, tuple(t.clone() for t in step)), consts, value)
        return value


@dataclass(frozen=True)
class _RopeRows:
    cos: torch.Tensor            # [T, 1, D]: the table's row at each token's position, both halves
    sin: torch.Tensor
    blocks: torch.Tensor         # KV slots to write: block, offset in block, token row (None: every row)
    offsets: torch.Tensor
    rows: torch.Tensor | None
    few: tuple[tuple[int, int, int], ...] | None    # (row, block, offset) when so few that copies beat a scatter


def _rope_rows(positions, slot_mapping, cos, sin, block_size) -> _RopeRows:
    c, s = cos[positions], sin[positions]
    keep = slot_mapping >= 0
    rows = None if bool(keep.all()) else keep.nonzero().flatten()
    slots = slot_mapping if rows is None else slot_mapping[rows]
    blocks, offsets = slots // block_size, slots % block_size
    rows_list = range(len(slot_mapping)) if rows is None else rows.tolist()
    few = tuple(zip(rows_list, blocks.tolist(), offsets.tolist())) if len(slots) <= FEW_SLOTS else None
    return _RopeRows(torch.cat((c, c), -1)[:, None], torch.cat((s, s), -1)[:, None], blocks, offsets, rows, few)


_rope_step = _PerStep(_rope_rows)


def rope_qkv_cpu(x: torch.Tensor, w_qkv: CpuWeight, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool) -> torch.Tensor:
    """rope_qkv_torch's contract."""
    return rope_kv_write(qmatmul_cpu(x, w_qkv), positions, cos, sin, k_cache, v_cache, slot_mapping,
                         n_heads, n_kv_heads, head_dim, use_rope)


def rope_kv_write(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool) -> torch.Tensor:
    """The rest of rope_qkv after the projection: q returned, K and V written. Q and K heads
    rotate together, as x * cos + rotate_half(x) * sin, which is the reference's
    x1 c - x2 s, x2 c + x1 s operation for operation (bit-identical)."""
    T = qkv.shape[0]
    k_end = (n_heads + n_kv_heads) * head_dim
    t = _rope_step((positions, slot_mapping), cos, sin, k_cache.shape[2])
    qk = qkv[:, :k_end].view(T, n_heads + n_kv_heads, head_dim)
    if use_rope:
        half = head_dim // 2
        qk = qk * t.cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * t.sin
    k, v = qk[:, n_heads:], qkv[:, k_end:].view(T, n_kv_heads, head_dim)
    if t.few is not None:
        for row, block, offset in t.few:
            k_cache[block, :, offset] = k[row]
            v_cache[block, :, offset] = v[row]
    else:
        if t.rows is not None:
            k, v = k[t.rows], v[t.rows]
        k_cache[t.blocks, :, t.offsets] = k.to(k_cache.dtype)
        v_cache[t.blocks, :, t.offsets] = v.to(v_cache.dtype)
    return qk[:, :n_heads]


class _Gather:
    """K or V of B sequences' blocks as [B, Hkv, n_keys, D] in one index_select: the pool
    seen as rows of one (block, KV head) each, [n_blocks * Hkv, bs * D], read in (sequence,
    head, block) order, is already that layout. Into buffers made once per step and reused
    by every layer (fresh tensors of a long context cost page faults per layer)."""

    def __init__(self, tables: torch.Tensor, cache_shape: torch.Size, dtype: torch.dtype, n_keys: int):
        B, n = tables.shape
        _, hkv, bs, d = cache_shape
        self.index = (tables.long()[:, None, :] * hkv + torch.arange(hkv)[None, :, None]).flatten()
        self.keys = torch.empty((2, B * hkv * n, bs * d), dtype=dtype)      # K, V
        self.shape = (B, hkv, n * bs, d)
        self.n_keys = n_keys

    def __call__(self, cache: torch.Tensor, kv: int) -> torch.Tensor:
        rows = cache.view(-1, cache.shape[2] * cache.shape[3])
        out = torch.index_select(rows, 0, self.index, out=self.keys[kv])
        return out.view(self.shape)[:, :, :self.n_keys]


@dataclass(frozen=True)
class _Decodes:
    """Sequences with one query this step and the same context length, attended together:
    each at exactly its own keys (no padding, no mask), so a row's result does not
    depend on the batch."""
    rows: torch.Tensor | None    # their query rows (None: rows 0..B-1 are the whole step, in order)
    keys: _Gather                # exactly their context


@dataclass(frozen=True)
class _Prompt:
    """One sequence with several queries: its keys, and its query tiles with their causal masks."""
    keys: _Gather                # its context rounded up to whole KEY_BLOCKs (beyond: block 0, masked)
    tiles: tuple[tuple[slice, torch.Tensor], ...]   # (rows, mask [rows * group, keys])


def _attention_plan(query_start, seq_lens, block_tables, cache_shape: torch.Size, dtype: torch.dtype, group: int):
    starts, lens = query_start.tolist(), seq_lens.tolist()
    block_size = cache_shape[2]
    singles = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1 and lens[b] > 0]
    by_len: dict[int, list[int]] = {}
    for b in singles:
        by_len.setdefault(lens[b], []).append(b)
    in_order = len(by_len) == 1 and singles == list(range(len(lens))) and starts[-1] == len(lens)
    decodes = tuple(_Decodes(None if in_order else torch.tensor([starts[b] for b in seqs]),
                             _Gather(block_tables[seqs, :-(-n // block_size)], cache_shape, dtype, n))
                    for n, seqs in by_len.items())
    prompts = []
    for b in range(len(lens)):
        n_q = starts[b + 1] - starts[b]
        if n_q <= 1 or lens[b] == 0:
            continue
        n_keys = -(-lens[b] // KEY_BLOCK) * KEY_BLOCK
        key_pos = torch.arange(n_keys)
        tiles = []
        for t0 in range(0, n_q, QUERY_TILE):
            r = min(QUERY_TILE, n_q - t0)
            pos = lens[b] - n_q + t0 + torch.arange(r).repeat_interleave(group)
            tiles.append((slice(starts[b] + t0, starts[b] + t0 + r), key_pos[None, :] <= pos[:, None]))
        tables = block_tables[b:b + 1, :-(-lens[b] // block_size)]
        tables = F.pad(tables, (0, n_keys // block_size - tables.shape[1]))
        prompts.append(_Prompt(_Gather(tables, cache_shape, dtype, n_keys), tuple(tiles)))
    return decodes, tuple(prompts)


_attention_step = _PerStep(_attention_plan)


def attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int,
                  scale: float) -> torch.Tensor:
    """attention_torch's contract on torch's fused SDPA. A KV head's query heads are
    folded into the query rows ([B, Hkv, rows * group, D]), so keys are read once per
    group; a sequence reads exactly its own keys (a prompt's tiles: causally masked)."""
    N, H, D = q.shape
    hkv = k_cache.shape[1]
    group = H // hkv
    decodes, prompts = _attention_step((query_start, seq_lens, block_tables), k_cache.shape, k_cache.dtype, group)
    if len(decodes) == 1 and decodes[0].rows is None:        # a pure decode step, one context length
        return _attend_decodes(q, k_cache, v_cache, decodes[0], scale).to(q.dtype)
    out = torch.zeros_like(q)
    for d in decodes:
        out[d.rows] = _attend_decodes(q[d.rows], k_cache, v_cache, d, scale).to(q.dtype)
    for p in prompts:
        k, v = p.keys(k_cache, 0), p.keys(v_cache, 1)
        for rows, mask in p.tiles:
            r = rows.stop - rows.start
            tile = q[rows].view(r, hkv, group, D).permute(1, 0, 2, 3).reshape(1, hkv, r * group, D)
            o = F.scaled_dot_product_attention(tile.to(k.dtype), k, v, attn_mask=mask, scale=scale)
            out[rows] = o[0].view(hkv, r, group, D).permute(1, 0, 2, 3).reshape(r, H, D).to(q.dtype)
    return out


def _attend_decodes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: _Decodes,
                    scale: float) -> torch.Tensor:
    """q [B, H, D] of one-query sequences -> [B, H, D] in the cache's dtype."""
    B, H, D = q.shape
    hkv = k_cache.shape[1]
    k, v = d.keys(k_cache, 0), d.keys(v_cache, 1)
    o = F.scaled_dot_product_attention(q.reshape(B, hkv, H // hkv, D).to(k.dtype), k, v, scale=scale)
    return o.reshape(B, H, D)
