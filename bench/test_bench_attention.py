"""attention and rope_qkv Triton kernels against their eager references (and attention
against torch SDPA) at SmolLM3-3B shapes: 16 query heads, 4 KV heads, head_dim 128,
hidden 2048, bf16.

The cache is paged (block size 16, a random block table), as the engine runs it.
Cases: prefill of 512 / 2k / 8k tokens from position 0; decode of one token at 1k / 8k /
32k context; a decode step of 64 sequences at 1k context each (the batched engine).
Attention reports TFLOP/s for prefill (causal: 4 * H * D * T(T+1)/2 flops) and GB/s for
decode (the K and V rows read). rope_qkv (one launch: the QKV matmul with RoPE and the KV
write in its epilogue) reports GB/s. RMSNorm has no kernel of its own on the Triton path
(kernels/fusions.py).

Timing: REPS calls captured in one CUDA graph and replayed, as a decode step runs, so
launch overhead is excluded; the reference attention, which reads the length on the
host and so cannot be captured, runs REPS eager calls instead, and its line says so.
Without CUDA every case skips.
"""
from __future__ import annotations

import pytest
import torch

from smollm3_triton.tools.bench import vendor_peaks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a GPU kernel benchmark")]

N_HEADS, N_KV, HEAD_DIM, HIDDEN = 16, 4, 128, 2048
THETA = 5e6
PREFILL = [512, 2048, 8192]
DECODE_CTX = [1024, 8192, 32768]
REPS = 20
DTYPE = torch.bfloat16
def runner(fn, capture: bool):
    """A callable running fn REPS times then synchronising: replaying one CUDA graph of
    REPS calls, or (capture False, for code that syncs with the host) calling eagerly."""
    fn()                                   # compile outside the capture
    torch.cuda.synchronize()
    if not capture:
        def eager():
            for _ in range(REPS):
                fn()
            torch.cuda.synchronize()
        return eager
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(REPS):
                fn()
    torch.cuda.synchronize()

    def replay():
        graph.replay()
        torch.cuda.synchronize()
    return replay


def measure(benchmark, report_figure, label, fn, *, nbytes=None, flops=None, capture=True):
    run = runner(fn, capture)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median / REPS
    gbps, tflops = vendor_peaks()
    line = f"{label:<44} {seconds * 1e6:10.1f} us"
    info = dict(us=seconds * 1e6, graph=capture, device=torch.cuda.get_device_name())
    if nbytes is not None:
        rate = nbytes / seconds / 1e9
        line += f"  {rate:8.1f} GB/s" + (f" ({rate / gbps:5.1%} of {gbps:.0f})" if gbps else "")
        info["gbps"] = rate
    if flops is not None:
        rate = flops / seconds / 1e12
        line += f"  {rate:7.1f} TFLOP/s" + (f" ({rate / tflops:5.1%} of {tflops:.0f})" if tflops else "")
        info["tflops"] = rate
    if not capture:
        line += "  [eager calls, not graph-captured]"
    benchmark.extra_info.update(info)
    report_figure(line)


def rope_tables(max_seq):
    inv_freq = THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64, device="cuda") / HEAD_DIM)
    ang = torch.arange(max_seq, dtype=torch.float64, device="cuda")[:, None] * inv_freq
    return ang.cos().float(), ang.sin().float()


BLOCK = 16
BATCH_DECODE = [(64, 1024)]


def kv_cache(max_seq):
    """Contiguous [N_KV, max_seq, D] caches (for SDPA)."""
    g = torch.Generator(device="cuda").manual_seed(max_seq)
    return (torch.randn(N_KV, max_seq, HEAD_DIM, device="cuda", generator=g).to(DTYPE),
            torch.randn(N_KV, max_seq, HEAD_DIM, device="cuda", generator=g).to(DTYPE))


class Paged:
    """A paged pool holding `n_seqs` sequences of `ctx` tokens, their block tables (a random
    permutation of the pool) and a step of `q_len` queries per sequence."""

    def __init__(self, n_seqs, ctx, q_len):
        per_seq = -(-ctx // BLOCK)
        n_blocks = n_seqs * per_seq
        g = torch.Generator(device="cuda").manual_seed(ctx)
        self.k = torch.randn(n_blocks, N_KV, BLOCK, HEAD_DIM, device="cuda", generator=g).to(DTYPE)
        self.v = torch.randn(n_blocks, N_KV, BLOCK, HEAD_DIM, device="cuda", generator=g).to(DTYPE)
        perm = torch.randperm(n_blocks, device="cuda", generator=g).int()
        self.block_tables = perm.view(n_seqs, per_seq)
        self.query_start = torch.arange(0, (n_seqs + 1) * q_len, q_len, dtype=torch.int32, device="cuda")
        self.seq_lens = torch.full((n_seqs,), ctx, dtype=torch.int32, device="cuda")
        self.q = torch.randn(n_seqs * q_len, N_HEADS, HEAD_DIM, device="cuda").to(DTYPE)
        self.max_query_len = q_len

    def args(self):
        return (self.q, self.k, self.v, self.query_start, self.seq_lens, self.block_tables, self.max_query_len,
                HEAD_DIM ** -0.5)


def sdpa(q, k_cache, v_cache, kv_len, causal):
    """torch's fused attention on the same data ([1, H, T, D] views; GQA by enable_gqa)."""
    qh = q.transpose(0, 1).unsqueeze(0)
    kh, vh = k_cache[:, :kv_len].unsqueeze(0), v_cache[:, :kv_len].unsqueeze(0)
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("impl", ["triton", "sdpa", "eager"])
@pytest.mark.parametrize("T", PREFILL)
def test_attention_prefill(benchmark, report_figure, T, impl):
    from smollm3_triton.kernels.attention import attention_triton
    from smollm3_triton.kernels.attention_reference import attention_torch

    p = Paged(1, T, T)
    k_cache, v_cache = kv_cache(T)
    fn = {"triton": lambda: attention_triton(*p.args()),
          "sdpa": lambda: sdpa(p.q, k_cache, v_cache, T, True),
          "eager": lambda: attention_torch(*p.args())}[impl]
    flops = 4 * N_HEADS * HEAD_DIM * T * (T + 1) // 2
    measure(benchmark, report_figure, f"attention prefill {impl:<6} T={T}", fn, flops=flops,
            capture=impl != "eager")


DECODE_CASES = [(1, ctx) for ctx in DECODE_CTX] + BATCH_DECODE


@pytest.mark.parametrize("impl", ["triton", "sdpa", "eager"])
@pytest.mark.parametrize("n_seqs,ctx", DECODE_CASES, ids=[f"B{b}-ctx{c}" for b, c in DECODE_CASES])
def test_attention_decode(benchmark, report_figure, n_seqs, ctx, impl):
    from smollm3_triton.kernels.attention import attention_triton
    from smollm3_triton.kernels.attention_reference import attention_torch

    if impl == "sdpa" and n_seqs > 1:
        pytest.skip("SDPA has no paged varlen form")
    p = Paged(n_seqs, ctx, 1)
    k_cache, v_cache = kv_cache(ctx)
    fn = {"triton": lambda: attention_triton(*p.args()),
          "sdpa": lambda: sdpa(p.q, k_cache, v_cache, ctx, False),
          "eager": lambda: attention_torch(*p.args())}[impl]
    nbytes = n_seqs * (2 * N_KV * ctx * HEAD_DIM * DTYPE.itemsize + 2 * N_HEADS * HEAD_DIM * DTYPE.itemsize)
    measure(benchmark, report_figure, f"attention decode {impl:<6} B={n_seqs} ctx={ctx}", fn, nbytes=nbytes,
            capture=impl != "eager")


def paged_cache(max_seq):
    n_blocks = -(-max_seq // BLOCK)
    g = torch.Generator(device="cuda").manual_seed(max_seq)
    return (torch.randn(n_blocks, N_KV, BLOCK, HEAD_DIM, device="cuda", generator=g).to(DTYPE),
            torch.randn(n_blocks, N_KV, BLOCK, HEAD_DIM, device="cuda", generator=g).to(DTYPE))


ROPE_CASES = [("prefill", T, 0) for T in PREFILL] + [("decode", 1, ctx - 1) for ctx in DECODE_CTX]


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("phase,T,start", ROPE_CASES, ids=[f"{p}-T{t}-at{s}" for p, t, s in ROPE_CASES])
def test_rope_qkv(benchmark, report_figure, phase, T, start, impl):
    """The whole op (projection by a bf16 weight + RoPE + KV write), as the model calls it."""
    from smollm3_triton.gguf.constants import GGMLType
    from smollm3_triton.gguf.tensors import QuantTensor
    from smollm3_triton.kernels.rope_qkv import rope_qkv_torch, rope_qkv_triton

    max_seq = max(start + T, 64)
    k_cache, v_cache = paged_cache(max_seq)
    cos, sin = rope_tables(max_seq)
    n_out = (N_HEADS + 2 * N_KV) * HEAD_DIM
    w = QuantTensor((torch.randn(n_out, HIDDEN, device="cuda") / HIDDEN ** 0.5).to(DTYPE), GGMLType.BF16,
                    (n_out, HIDDEN))
    x = torch.randn(T, HIDDEN, device="cuda").to(DTYPE)
    pos = torch.arange(start, start + T, device="cuda")
    op = rope_qkv_triton if impl == "triton" else rope_qkv_torch
    nbytes = w.nbytes + x.numel() * DTYPE.itemsize + T * n_out * DTYPE.itemsize
    measure(benchmark, report_figure, f"rope_qkv {impl:<6} {phase} T={T} at {start}",
            lambda: op(x, w, pos, cos, sin, k_cache, v_cache, pos, N_HEADS, N_KV, HEAD_DIM, True),
            nbytes=nbytes, flops=2 * T * n_out * HIDDEN if T > 1 else None)
