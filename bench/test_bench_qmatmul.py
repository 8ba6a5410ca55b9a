"""qmatmul_triton (and the fused gate+up SwiGLU) against the eager reference at SmolLM3-3B shapes.

Eager reference: qmatmul_torch, i.e. dequantize the whole matrix to fp32, then
matmul. Shapes (N <- K): fused QKV 3072 <- 2048, gate+up 22016 <- 2048, down
2048 <- 11008, LM head 128256 <- 2048; M = 1 (decode) and 512 (prefill);
weights Q4_K, Q6_K, Q8_0 (one type per matrix); activations bf16.

Timing: each case runs REPS calls captured in one CUDA graph (as a decode step
runs), so the figure is the kernel's time, not the Python launch's; a call that
cannot be captured is timed as a plain loop, marked "loop" in its line. GB/s counts
the GGUF weight bytes plus x and y once per call; the fraction is of the device's
peak DRAM bandwidth (BENCH_PEAK_GBPS overrides the table below). M = 512 also
reports TFLOP/s against the dense bf16 peak (BENCH_PEAK_TFLOPS overrides).
Without CUDA every case skips.
"""
from __future__ import annotations

import pytest
import torch

from smollm3_triton.tools.bench import vendor_peaks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a GPU kernel benchmark")]

SHAPES = {"qkv": (3072, 2048), "gate_up": (22016, 2048), "down": (2048, 11008), "lm_head": (128256, 2048)}
TYPES = ["Q4_K", "Q6_K", "Q8_0"]
ROWS = [1, 512]
REPS = 20
# fp16 scale fields of each block (ggml-common.h), set to sane values in random blocks.
FP16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


def random_weight(qtype: str, rows: int, cols: int):
    """Random GGUF blocks on the GPU: every quant pattern, fp16 scales in [2^-10, 2^-6]."""
    from smollm3_triton.gguf.constants import BLOCK_SIZES, GGMLType
    from smollm3_triton.gguf.tensors import QuantTensor

    t = GGMLType[qtype]
    elems, nbytes = BLOCK_SIZES[t]
    g = torch.Generator(device="cuda").manual_seed(rows)
    blocks = torch.randint(0, 256, (rows, cols // elems, nbytes), dtype=torch.uint8, device="cuda", generator=g)
    for off in FP16_FIELDS[qtype]:
        scale = torch.exp2(torch.rand(rows, cols // elems, device="cuda", generator=g) * 4 - 10).half()
        blocks[..., off:off + 2] = scale.unsqueeze(-1).view(torch.uint8)
    return QuantTensor(blocks.view(rows, -1), t, (rows, cols))


def graph_of(fn, reps: int):
    """(replay, how): fn() REPS times in one CUDA graph, replay synchronised. Where fn cannot be
    captured (a host sync inside), a plain loop of REPS calls instead, and `how` says so."""
    fn()                                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    try:
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(reps):
                    fn()
        torch.cuda.synchronize()
    except RuntimeError:
        torch.cuda.synchronize()

        def loop():
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        return loop, "loop"

    def replay():
        graph.replay()
        torch.cuda.synchronize()
    return replay, "graph"


@pytest.fixture(scope="module")
def weights():
    cache = {}

    def get(qtype, shape):
        if (qtype, shape) not in cache:
            cache.clear()                  # one matrix at a time: the LM head in fp32 is 1 GB on its own
            from smollm3_triton.kernels.qtiles import prepare_tiles
            n, k = SHAPES[shape]
            raw = random_weight(qtype, n, k)
            cache[(qtype, shape)] = (raw, prepare_tiles(raw))
        return cache[(qtype, shape)]
    return get


@pytest.mark.parametrize("impl", ["triton", "eager", "triton_swiglu"])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("qtype", TYPES)
def test_qmatmul(benchmark, weights, report_figure, qtype, shape, m, impl):
    from smollm3_triton.kernels.qmatmul import qmatmul_torch, qmatmul_triton
    from smollm3_triton.kernels.swiglu import gate_up_swiglu_triton

    if impl == "triton_swiglu" and shape != "gate_up":
        pytest.skip("the fused activation applies to gate+up only")
    raw, prepared = weights(qtype, shape)
    n, k = SHAPES[shape]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    fn = {"triton": lambda: qmatmul_triton(x, prepared), "eager": lambda: qmatmul_torch(x, raw),
          "triton_swiglu": lambda: gate_up_swiglu_triton(x, prepared)}[impl]
    timed, how = graph_of(fn, REPS)
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median / REPS
    n_out = n // 2 if impl == "triton_swiglu" else n
    moved = raw.nbytes + x.numel() * 2 + m * n_out * 2
    gbps, tflops = vendor_peaks()
    line = (f"qmatmul {impl:<13} {qtype} {shape:<8} M={m:<4} {how:<5} {seconds * 1e6:9.1f} us  "
            f"{moved / seconds / 1e9:8.1f} GB/s" + (f" ({moved / seconds / 1e9 / gbps:5.1%} of {gbps:.0f})"
                                                   if gbps else ""))
    if m > 1:
        achieved = 2 * m * n * k / seconds / 1e12
        line += f"  {achieved:7.1f} TFLOP/s" + (f" ({achieved / tflops:5.1%} of {tflops:.0f})" if tflops else "")
    benchmark.extra_info.update(us=seconds * 1e6, gbps=moved / seconds / 1e9, timing=how,
                                device=torch.cuda.get_device_name())
    report_figure(line)
