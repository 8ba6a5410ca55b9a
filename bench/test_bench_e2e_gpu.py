"""End-to-end GPU throughput on synthetic SmolLM3-3B files (bench/synthetic.py: the exact
shapes and llama.cpp's per-tensor types for Q4_K_M, Q8_0 and F16, random valid blocks).

For each type, in one run:
- prefill tokens/s at 512, 2048 and 8192 prompt tokens (Triton kernels), beside the
  compute roofline (FLOPs / dense bf16 peak);
- decode tokens/s at context 1024 and 32768 with the CUDA-graph decoder (greedy), beside
  the bandwidth roofline (bytes read per token / DRAM bandwidth: vendor peak and a
  measured device copy) and as GB/s; at 1024 also with temperature/top-p sampling on
  the device, the same Triton step run eagerly (no graph), and tokens as the public
  generate loop delivers them to the host;
- the eager reference (torch backend: dequantize + matmul, plain attention) on the
  same file and in the same harness.
See smollm3_triton/bench.py for how each figure is taken.

Results: printed in the "bench figures" summary and written as JSON to
$BENCH_RESULTS (or $OUT, else bench/results/) as bench_e2e.json, rewritten after every
case so a run cut short keeps what it measured. BENCH_QUANTS (comma-separated) picks
the types; BENCH_MODEL_DIR keeps the synthetic files between runs; BENCH_PEAK_GBPS /
BENCH_PEAK_TFLOPS override the device table. Without CUDA every case skips.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_synthetic  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: end-to-end GPU benchmark")]

SHAPE = "smollm3-3b"
QUANTS = [q for q in os.environ.get("BENCH_QUANTS", "q4_k_m,q8_0,f16").split(",") if q]
PREFILL = [512, 2048, 8192]
CONTEXTS = [1024, 32768]
DECODE_TOKENS = 128
ROUNDS = 3
EAGER_DECODE_TOKENS = 8
MAX_SEQ_LEN = max(CONTEXTS) + DECODE_TOKENS + 64

RESULTS: dict = {"machine": {}, "runs": []}


def results_path() -> Path:
    root = os.environ.get("BENCH_RESULTS") or os.environ.get("OUT")
    return Path(root) if root else Path(__file__).resolve().parent / "results"


def record(quant: str, result, report_figure, extra: str = "") -> None:
    RESULTS["runs"].append({"model": f"synthetic {SHAPE} {quant}", **asdict(result)})
    report_figure(f"{SHAPE} {quant:<6} {result.line()}{extra}")
    out = results_path()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_e2e.json").write_text(json.dumps(RESULTS, indent=2))


@pytest.fixture(scope="session")
def peaks():
    from smollm3_triton.bench import device_peaks
    env = {k: float(os.environ[k]) for k in ("BENCH_PEAK_GBPS", "BENCH_PEAK_TFLOPS") if os.environ.get(k)}
    p = device_peaks(torch.device("cuda"), env.get("BENCH_PEAK_GBPS"), env.get("BENCH_PEAK_TFLOPS"))
    import triton
    RESULTS["machine"] = {"device": asdict(p), "torch": torch.__version__, "triton": triton.__version__,
                          "cuda": torch.version.cuda, "python": platform.python_version()}
    return p


@pytest.fixture(scope="module", params=QUANTS)
def model_file(request, tmp_path_factory):
    folder = Path(os.environ["BENCH_MODEL_DIR"]) if os.environ.get("BENCH_MODEL_DIR") else \
        tmp_path_factory.mktemp("synthetic")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic-{SHAPE}-{request.param}.gguf"
    if not path.exists():
        start = time.perf_counter()
        write_synthetic(path.with_name(path.name + ".partial"), SHAPE, request.param).rename(path)
        print(f"\nwrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    return request.param, path


@pytest.fixture(scope="module")
def triton_rt(model_file):
    from smollm3_triton import Runtime
    from smollm3_triton.bench import model_cost
    quant, path = model_file
    rt = Runtime.load(path, device="cuda", backend="triton", max_seq_len=MAX_SEQ_LEN)
    yield quant, rt, model_cost(path, rt.config, rt.model.dtype)
    del rt
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def decoder(triton_rt):
    from smollm3_triton.cuda_graph import GraphDecoder
    return GraphDecoder(triton_rt[1].model, use_graph=True)


def once(benchmark, fn):
    """Run fn (which takes its own rounds) once under pytest-benchmark, returning its result."""
    box = []
    benchmark.pedantic(lambda: box.append(fn()), rounds=1, iterations=1)
    result = box[0]
    benchmark.extra_info.update({k: v for k, v in asdict(result).items() if k != "runs"})
    return result


@pytest.mark.parametrize("n", PREFILL)
def test_prefill(benchmark, triton_rt, peaks, report_figure, n):
    from smollm3_triton.bench import prefill_result
    quant, rt, cost = triton_rt
    record(quant, once(benchmark, lambda: prefill_result(rt.model, cost, peaks, "triton", n, ROUNDS)), report_figure)


@pytest.mark.parametrize("context", CONTEXTS)
def test_decode_graph(benchmark, triton_rt, decoder, peaks, report_figure, context):
    from smollm3_triton.bench import decode_result
    quant, rt, cost = triton_rt
    result = once(benchmark, lambda: decode_result(decoder, cost, peaks, "graph", context, DECODE_TOKENS, ROUNDS))
    assert decoder._graphs, "the decode step was not captured in a CUDA graph"
    record(quant, result, report_figure)


def test_decode_graph_sampled(benchmark, triton_rt, decoder, peaks, report_figure):
    from smollm3_triton.bench import decode_result
    from smollm3_triton.generation import SamplingParams
    quant, rt, cost = triton_rt
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0)
    result = once(benchmark, lambda: decode_result(decoder, cost, peaks, "graph+top-p", CONTEXTS[0],
                                                   DECODE_TOKENS, ROUNDS, params))
    record(quant, result, report_figure, "  (temperature 0.7, top-p 0.9)")


def test_decode_triton_eager(benchmark, triton_rt, peaks, report_figure):
    from smollm3_triton.bench import decode_result
    from smollm3_triton.cuda_graph import GraphDecoder
    quant, rt, cost = triton_rt
    eager = GraphDecoder(rt.model, use_graph=False)
    record(quant, once(benchmark, lambda: decode_result(eager, cost, peaks, "triton-eager", CONTEXTS[0],
                                                         DECODE_TOKENS, ROUNDS)), report_figure)


def test_generate_loop_and_graph_matches_eager(triton_rt, decoder, peaks, report_figure):
    """Tokens as generate_tokens hands them to the host (prefill of 1024 tokens, then
    greedy steps with lookahead); and the graph's tokens equal the eager step's."""
    from smollm3_triton.bench import Result, random_ids
    from smollm3_triton.cuda_graph import GraphDecoder
    from smollm3_triton.generation import SamplingParams
    quant, rt, cost = triton_rt
    prompt = random_ids(CONTEXTS[0], rt.config.vocab_size, seed=1).tolist()
    params = SamplingParams(max_new_tokens=DECODE_TOKENS, temperature=0.0)
    stamps, tokens = [], []
    for token in decoder.generate_tokens(prompt, params, set()):
        stamps.append(time.perf_counter())
        tokens.append(token)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    nbytes = cost.decode_bytes(CONTEXTS[0])
    roof = peaks.peak_gbps * 1e9 / nbytes if peaks.peak_gbps else None
    record(quant, Result("decode", "generate-loop", CONTEXTS[0], rate, [rate], roof, rate / roof if roof else None,
                         gb_per_s=nbytes * rate / 1e9), report_figure, "  (host reads every token)")
    n = min(16, DECODE_TOKENS)
    eager = list(GraphDecoder(rt.model, use_graph=False).generate_tokens(prompt, SamplingParams(
        max_new_tokens=n, temperature=0.0), set()))
    assert tokens[:n] == eager


@pytest.fixture(scope="module")
def torch_rt(model_file, triton_rt):
    from smollm3_triton import Runtime
    quant, path = model_file
    rt = Runtime.load(path, device="cuda", backend="torch", max_seq_len=MAX_SEQ_LEN)
    yield rt
    del rt
    torch.cuda.empty_cache()


@pytest.mark.parametrize("n", PREFILL)
def test_prefill_eager_reference(benchmark, triton_rt, torch_rt, peaks, report_figure, n):
    from smollm3_triton.bench import prefill_result
    quant, _, cost = triton_rt
    record(quant, once(benchmark, lambda: prefill_result(torch_rt.model, cost, peaks, "torch-eager", n, 1)),
           report_figure)


@pytest.mark.parametrize("context", CONTEXTS)
def test_decode_eager_reference(benchmark, triton_rt, torch_rt, peaks, report_figure, context):
    from smollm3_triton.bench import decode_result
    from smollm3_triton.cuda_graph import GraphDecoder
    quant, _, cost = triton_rt
    eager = GraphDecoder(torch_rt.model, use_graph=False)
    record(quant, once(benchmark, lambda: decode_result(eager, cost, peaks, "torch-eager", context,
                                                         EAGER_DECODE_TOKENS, 1)), report_figure)
