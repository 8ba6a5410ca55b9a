"""One token per sequence from its logits row, for a whole batch in one Triton launch:
`sample_triton`, which keeps the contract of `sample_torch` (kernels/sampling_reference.py:
penalties, a grammar bitmask, temperature, top-k, top-p, min-p and a seeded draw; the
sampler's state rows, SamplingState, are defined there too).

One program per sample streams its row, no sort of the vocabulary.
Pass A: the maximum (greedy answer) and a histogram of z' in bins of width 1/8 (relative to
the running maximum: a larger maximum shifts it by whole bins); from the counts alone it
bounds where the top-k, top-p and min-p thresholds can lie. Pass B: z' exactly, the softmax
sum, and the candidates above that bound (at most CAP) into a scratch row, sorted in
registers, where the thresholds and the draw are resolved exactly. A row with more
candidates (a very flat distribution, a large top-k) bisects over z''s bits instead (~66
passes: exact, slower). Unfiltered rows draw in pass B; greedy rows stop after pass A.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from . import gpu
from .sampling_reference import (CAP, HISTORY_MAX_COUNT, MASK32, MIX_MULTIPLIER, SATURATED, SamplingState,
                                 allowed_tokens, check_inputs, exponential_noise, filtered_probs, mix32,
                                 penalized_logits, sample_torch)

# The sampling op's names, kernel and reference, are reached through this module.
__all__ = ["BLOCK_V", "CAP", "HISTORY_MAX_COUNT", "MASK32", "SamplingState", "allowed_tokens", "exponential_noise",
           "filtered_probs", "mix32", "penalized_logits", "sample_torch", "sample_triton"]

BLOCK_V = 1024       # vocabulary entries per tile of a pass

# ---------------------------------------------------------------- the kernel
_W = tl.constexpr(0.125)        # histogram bin width, in units of z'
_NB = 256                       # bins: 0..253 regular, 254 underflow (z' below ~-31.5), 255 ignored (-inf)
_UNDER = tl.constexpr(254)
_IGNORE = tl.constexpr(255)
_NEG_INF = tl.constexpr(float("-inf"))
_MIX32 = tl.constexpr(MIX_MULTIPLIER)
_SATURATED = tl.constexpr(SATURATED)


@triton.jit
def _row_z(logit_row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency):
    """A tile of the row's z: grammar mask, then the penalties; -inf outside the vocabulary."""
    inside = offs < V
    z = tl.load(logit_row + offs, mask=inside, other=_NEG_INF).to(tl.float32)
    if masked:
        word = tl.load(st_bitmask + r * words + offs // 32, mask=inside, other=0)
        z = tl.where(((word >> (offs % 32)) & 1) != 0, z, _NEG_INF)
    if pen:
        code = tl.load(st_history + r * V + offs, mask=inside, other=0).to(tl.int32) & 0xFFFF
        count = code >> 1
        seen = code != 0
        z = tl.where(seen, tl.where(z > 0, z / rep, z * rep), z)
        z = tl.where(count > 0, z - (presence + frequency * count.to(tl.float32)), z)
    return tl.where(inside, z, _NEG_INF)


@triton.jit
def _scaled(z, z_max, temperature):
    """z' = (z - max) / T in float64, rounded to float32, as the reference computes it."""
    return ((z.to(tl.float64) - z_max) / temperature).to(tl.float32)


@triton.jit
def _mix32(x):
    """mix32 on uint32 (the multiply wraps: the int64 reference's product masked to 32 bits)."""
    mul = tl.full((), _MIX32, tl.uint32)
    x = ((x >> 16) ^ x) * mul
    x = ((x >> 16) ^ x) * mul
    return (x >> 16) ^ x


@triton.jit
def _noise(offs, token_key, draw_key):
    """E ~ Exp(1) per token id, as exponential_noise(mix32(id ^ token key), draw key)."""
    bits = _mix32(_mix32(offs.to(tl.uint32) ^ token_key) ^ draw_key) >> 9
    return -tl.log((bits.to(tl.float32) + 0.5) * 1.1920928955078125e-07)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _key(x):
    """An int64 key ordered as the float32 x: 0 .. 2**32 - 1."""
    b = x.to(tl.int32, bitcast=True).to(tl.int64)
    u = b & 0xFFFFFFFF
    return tl.where(b < 0, 0xFFFFFFFF - u, u + 0x80000000)


@triton.jit
def _value(key):
    """The float32 of a _key."""
    u = tl.where(key >= 0x80000000, key - 0x80000000, 0xFFFFFFFF - key)
    return tl.where(u >= 0x80000000, u - 0x100000000, u).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(logits_ptr, stride_l, lrows_ptr, rows_ptr, out_ptr, V, words,
                   st_t, st_k, st_p, st_minp, st_pen, st_penalized, st_keys, st_steps, st_history,
                   st_masked, st_bitmask, st_last, st_scratch, scratch_stride,
                   CAP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    s = tl.program_id(0)
    r = tl.load(rows_ptr + s).to(tl.int64)
    row = logits_ptr + tl.load(lrows_ptr + s).to(tl.int64) * stride_l
    temperature = tl.load(st_t + r)
    pen = tl.load(st_penalized + r) != 0
    masked = tl.load(st_masked + r) != 0
    rep, presence, frequency = tl.load(st_pen + 3 * r), tl.load(st_pen + 3 * r + 1), tl.load(st_pen + 3 * r + 2)
    top_k, top_p, min_p = tl.load(st_k + r), tl.load(st_p + r), tl.load(st_minp + r)
    token_key = tl.load(st_keys + 2 * r).to(tl.uint32)
    step = tl.load(st_steps + r)
    draw_key = _mix32(step.to(tl.uint32) ^ tl.load(st_keys + 2 * r + 1).to(tl.uint32))
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, NB)
    # bins of width W * T on z; the histogram is relative to `ref`, a lattice point >= the running maximum
    bin_z = tl.minimum(1.0 / (_W * tl.maximum(temperature, 1e-300)), 1e30).to(tl.float32)

    # ---- pass A: the maximum, its first index, the histogram
    z_max = tl.full((), _NEG_INF, tl.float32)
    greedy = tl.full((), 0, tl.int64)
    ref = tl.full((), _NEG_INF, tl.float32)
    hist = tl.zeros((NB,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
        tile_max = tl.max(z, 0)
        tile_arg = tl.argmax(z, 0).to(tl.int64) + start
        greedy = tl.where(tile_max > z_max, tile_arg, greedy)
        z_max = tl.maximum(z_max, tile_max)
        grow = tile_max > ref
        shift = tl.where(grow, tl.maximum(tl.minimum(tl.ceil((tile_max - ref) * bin_z), 1e9), 0.0), 0.0)
        shift = shift.to(tl.int32)
        ref = tl.where(shift >= _UNDER, tile_max, ref + shift.to(tl.float32) / bin_z)
        moved = tl.sum(tl.where((bins < _UNDER) & (bins + shift >= _UNDER), hist, 0), 0)
        hist = tl.where((bins >= shift) & (bins < _UNDER), tl.gather(hist, tl.maximum(bins - shift, 0), 0), 0) + \
            tl.where(bins == _UNDER, tl.sum(tl.where(bins == _UNDER, hist, 0), 0) + moved, 0)
        j = tl.minimum(tl.maximum(tl.minimum((ref - z) * bin_z, 1e9), 0.0), _UNDER).to(tl.int32)
        hist += tl.histogram(tl.where(z == _NEG_INF, _IGNORE, j), NB)
    hist = tl.where(bins == _IGNORE, 0, hist)
    token = greedy

    if temperature > 0:
        # ---- bounds from the counts: bin j holds z' in [-(j+2)W, -(j-2)W)
        jf = bins.to(tl.float32)
        n_finite = tl.sum(hist, 0)
        count_to = tl.cumsum(hist, 0)
        low = tl.where(bins < _UNDER, tl.exp(-(jf + 2) * _W), 0.0)
        high = tl.where(bins < _UNDER, tl.minimum(tl.exp(-(jf - 2) * _W), 1.0),
                        tl.where(bins == _UNDER, tl.exp(-(_UNDER - 2) * _W), 0.0))
        mass_up = tl.sum(hist.to(tl.float32) * high, 0) * 1.0001
        topk_on = top_k < n_finite
        j_k = tl.min(tl.where(count_to >= top_k, bins, NB), 0)
        mass_from = tl.cumsum(hist.to(tl.float32) * low, 0)
        j_p = tl.min(tl.where(mass_from >= top_p * mass_up, bins, NB), 0) + 4    # tokens of bins >= j_p: dropped
        edge_p = tl.where((top_p < 1) & (j_p + 2 < _UNDER), -(j_p + 2).to(tl.float32) * _W, _NEG_INF)
        edge_m = tl.where(min_p > 0, tl.log(min_p) - 0.001, _NEG_INF)
        edge = tl.where(topk_on, tl.where(j_k < _UNDER, -(j_k + 2).to(tl.float32) * _W, _NEG_INF),
                        tl.maximum(edge_p, edge_m))
        # tokens >= edge sit in bins < -edge / W + 2
        last_bin = tl.minimum(tl.where(edge == _NEG_INF, _UNDER, (-edge / _W).to(tl.int32) + 2), _UNDER)
        n_bound = tl.sum(tl.where(bins <= last_bin, hist, 0), 0)
        filtered = topk_on | (top_p < 1) | (min_p > 0)
        compact = filtered & (n_bound <= CAP)

        # ---- pass B: z' exactly, the softmax sum; the unfiltered draw, or the candidates
        total = tl.full((), 0.0, tl.float32)
        best = tl.full((), -1.0, tl.float32)
        n_cand = tl.full((), 0, tl.int32)
        scratch = st_scratch + r * scratch_stride
        for start in range(0, V, BLOCK):
            offs = start + lanes
            z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
            zs = _scaled(z, z_max, temperature)
            e = tl.exp(zs)
            total += tl.sum(e, 0)
            if filtered:
                if compact:
                    take = zs >= edge
                    at = n_cand + tl.cumsum(take.to(tl.int32), 0) - 1
                    packed = (_key(zs) - 0x80000000) * 0x100000000 + (0xFFFFFFFF - offs.to(tl.int64))
                    tl.store(scratch + at, packed, mask=take & (at < CAP))
                    n_cand += tl.sum(take.to(tl.int32), 0)
            else:
                score = tl.where(offs < V, e / _noise(offs, token_key, draw_key), -1.0)
                tile_best = tl.max(score, 0)
                tile_arg = tl.argmax(score, 0).to(tl.int64) + start
                token = tl.where(tile_best > best, tile_arg, token)
                best = tl.maximum(best, tile_best)
        if compact:
            tl.debug_barrier()
            slot = tl.arange(0, CAP)
            packed = tl.load(scratch + slot, mask=slot < n_cand, other=-0x7FFFFFFFFFFFFFFF - 1)
            packed = tl.sort(packed, descending=True)
            valid = slot < n_cand
            v = _value((packed >> 32) + 0x80000000)
            ids = 0xFFFFFFFF - (packed & 0xFFFFFFFF)
            kth = tl.where(topk_on, tl.sum(tl.where(slot == top_k - 1, v, 0.0), 0), _NEG_INF)
            keep = valid & (v >= kth)
            e = tl.where(keep, tl.exp(v), 0.0)
            mass = tl.where(topk_on, tl.sum(e, 0), total)
            p = e / mass
            before = tl.cumsum(p, 0) - p
            prev = tl.gather(v, tl.maximum(slot - 1, 0), 0)
            first = tl.associative_scan(tl.where((slot == 0) | (v != prev), slot, 0), 0, _max_combine)
            keep = keep & (tl.gather(before, first, 0) < tl.where(top_p < 1, top_p, 2.0))
            p_max = tl.max(tl.where(slot == 0, p, 0.0), 0)
            keep = keep & ~(p < min_p * p_max)
            score = tl.where(keep, p / _noise(ids, token_key, draw_key), -1.0)
            token = tl.sum(tl.where(slot == tl.argmax(score, 0), ids, 0), 0)
        elif filtered:
            token = _bisect_draw(row, V, r, st_history, st_bitmask, words, pen, masked, rep, presence,
                                 frequency, z_max, temperature, top_k, topk_on, top_p, min_p, token_key, draw_key,
                                 BLOCK)

    tl.store(out_ptr + s, token)
    tl.store(st_last + r, token)
    tl.store(st_steps + r, step + 1)
    if pen:
        code = tl.load(st_history + r * V + token).to(tl.int32) & 0xFFFF
        tl.store(st_history + r * V + token, tl.where(code < _SATURATED, code + 2, code).to(tl.int16))


@triton.jit
def _bisect_draw(row, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency,
                 z_max, temperature, top_k, topk_on, top_p, min_p, token_key, draw_key, BLOCK: tl.constexpr):
    """The thresholds found by bisection over z''s ordered bits (32 passes each), then the draw."""
    lanes = tl.arange(0, BLOCK)
    kth = tl.full((), 0, tl.int64)                  # the k-th largest key (0: keep every token)
    if topk_on:
        hi = tl.full((), 0x100000000, tl.int64)     # count(key >= lo) >= k > count(key >= hi)
        for _ in range(32):
            mid = (kth + hi) // 2
            n = tl.full((), 0, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence,
                           frequency)
                n += tl.sum((_key(_scaled(z, z_max, temperature)) >= mid).to(tl.int32), 0)
            big = n >= top_k
            kth = tl.where(big, mid, kth)
            hi = tl.where(big, hi, mid)
    mass = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
        zs = _scaled(z, z_max, temperature)
        mass += tl.sum(tl.where(_key(zs) >= kth, tl.exp(zs), 0.0), 0)
    cut = kth
    if top_p < 1:
        lo = tl.maximum(kth - 1, 0)                  # mass(key > lo) >= top_p > mass(key > cut)
        cut = tl.full((), 0xFFFFFFFF, tl.int64)
        for _ in range(32):
            mid = (lo + cut) // 2
            above = tl.full((), 0.0, tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence,
                           frequency)
                zs = _scaled(z, z_max, temperature)
                k = _key(zs)
                above += tl.sum(tl.where((k > mid) & (k >= kth), tl.exp(zs) / mass, 0.0), 0)
            small = above < top_p
            cut = tl.where(small, mid, cut)
            lo = tl.where(small, lo, mid)
        cut = tl.maximum(cut, kth)
    best = tl.full((), -1.0, tl.float32)
    token = tl.full((), 0, tl.int64)
    p_max = 1.0 / mass
    for start in range(0, V, BLOCK):
        offs = start + lanes
        z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
        zs = _scaled(z, z_max, temperature)
        p = tl.exp(zs) / mass
        keep = (_key(zs) >= cut) & (z != _NEG_INF) & ~(p < min_p * p_max)
        score = tl.where(keep, p / _noise(offs, token_key, draw_key), -1.0)
        tile_best = tl.max(score, 0)
        tile_arg = tl.argmax(score, 0).to(tl.int64) + start
        token = tl.where(tile_best > best, tile_arg, token)
        best = tl.maximum(best, tile_best)
    return token


def sample_triton(logits: torch.Tensor, logits_rows: torch.Tensor, rows: torch.Tensor, state: SamplingState,
                  out: torch.Tensor, *, cap: int = CAP) -> torch.Tensor:
    """out[s] = the token row rows[s] draws from logits[logits_rows[s]], in one launch (a `cap`
    below CAP sends more rows to the bisection path: for tests)."""
    check_inputs(logits, logits_rows, rows, state)
    if logits.stride(1) != 1:
        raise KernelInputError("sample: logits rows must be contiguous")
    if cap > state.scratch.shape[1] or cap & (cap - 1):
        raise KernelInputError(f"sample: cap must be a power of two <= {state.scratch.shape[1]}, got {cap}")
    if rows.numel():
        st = state
        _sample_kernel[(rows.numel(),)](
            logits, logits.stride(0), logits_rows, rows, out, st.vocab, st.bitmask.shape[1],
            st.temperature, st.top_k, st.top_p, st.min_p, st.penalties, st.penalized, st.keys, st.steps,
            st.history, st.masked, st.bitmask, st.last_token, st.scratch, st.scratch.stride(0),
            CAP=cap, BLOCK=BLOCK_V, NB=_NB, num_warps=8, **gpu.FP_FUSION)
    return out
