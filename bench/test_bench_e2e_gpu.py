"""End-to-end GPU throughput on synthetic SmolLM3-3B files (bench/synthetic.py: the exact
shapes and llama.cpp's per-tensor types for Q4_K_M, random valid blocks), through the
serving engine (Runtime.load(...).engine: Engine.add_request / step) on the Triton
kernels with the CUDA-graph runner.

- aggregate decode tokens/s with 1, 4, 16 and 64 sequences decoding together (greedy,
  CONC_PROMPT-token prompts prefilled first and not timed, CONC_TOKENS timed steps),
  beside the bandwidth roofline of a batched step (weights read once per step plus each
  sequence's K/V) and as GB/s;
- the same at 1 and 64 on the eager Triton forward (no graphs);
- the graph runner's greedy tokens against the eager forward's.

Results: printed in the "bench figures" summary and written as JSON to
$BENCH_RESULTS (or $OUT, else bench/results/) as bench_e2e.json, with the table in
bench_concurrency.md, rewritten after every case so a run cut short keeps what it
measured. BENCH_QUANTS (comma-separated) picks the files (default q4_k_m; the
concurrency cases run on q4_k_m); BENCH_MODEL_DIR keeps the synthetic files between
runs; BENCH_PEAK_GBPS / BENCH_PEAK_TFLOPS override the device table. Without CUDA
every case skips.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.helpers.synthetic import write_synthetic  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: end-to-end GPU benchmark")]

SHAPE = "smollm3-3b"
QUANTS = [q for q in os.environ.get("BENCH_QUANTS", "q4_k_m").split(",") if q]

RESULTS: dict = {"machine": {}, "runs": []}


def results_path() -> Path:
    root = os.environ.get("BENCH_RESULTS") or os.environ.get("OUT")
    return Path(root) if root else Path(__file__).resolve().parent / "results"


@pytest.fixture(scope="session")
def peaks():
    from smollm3_triton.tools.bench import device_peaks
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


def once(benchmark, fn):
    """Run fn (which takes its own rounds) once under pytest-benchmark, returning its result."""
    box = []
    benchmark.pedantic(lambda: box.append(fn()), rounds=1, iterations=1)
    return box[0]


# ---------------------------------------------------------------- concurrent decode (the engine)

CONCURRENCY = [1, 4, 16, 64]
CONC_QUANT = "q4_k_m"
CONC_PROMPT = 128          # prompt tokens per sequence (prefill, untimed)
CONC_TOKENS = 64           # timed decode steps per run
CONC_CONTEXT = CONC_PROMPT + CONC_TOKENS


@pytest.fixture(scope="module")
def engine_rt(model_file):
    """SmolLM3-3B Q4_K_M on the Triton kernels through the engine, max_num_seqs 64, with
    every CUDA-graph bucket captured before anything is timed. Prefix caching off: the
    runs reuse prompts, and a fully cached prompt would prefill differently."""
    from smollm3_triton import Runtime
    from smollm3_triton.tools.bench import model_cost
    quant, path = model_file
    if quant != CONC_QUANT:
        pytest.skip(f"the concurrency bench runs on {CONC_QUANT}")
    rt = Runtime.load(path, device="cuda", backend="triton", max_seq_len=2048, max_num_seqs=max(CONCURRENCY),
                      kv_cache_tokens=max(CONCURRENCY) * (CONC_CONTEXT + 64),
                      enable_prefix_caching=False)   # every run prefills the same way
    runner = rt.engine.runner.graphs               # every bucket captured by the load
    print(f"\ncaptured buckets {runner.captured}")
    yield quant, rt, model_cost(path, rt.config, rt.model.dtype), runner
    del rt
    torch.cuda.empty_cache()


def concurrent_decode(rt, n: int, eager: bool = False, tokens: int = CONC_TOKENS) -> tuple[float, float, list[list[int]]]:
    """n greedy requests of CONC_PROMPT random tokens: prefilled (untimed), then `tokens`
    decode steps of all n timed -> (aggregate tok/s, seconds per step, tokens of each)."""
    from smollm3_triton.sampling_params import SamplingParams
    from smollm3_triton.tools.bench import random_ids
    eng = rt.engine
    graphs = eng.runner.graphs
    if eager:
        eng.runner.graphs = None
    try:
        params = SamplingParams(max_new_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
        ids = [eng.add_request(random_ids(CONC_PROMPT, rt.config.vocab_size, seed=s).tolist(), params)
               for s in range(n)]
        got = {i: [] for i in ids}
        while any(not got[i] for i in ids):            # prefill: every request has its first token
            for out in eng.step():
                got[out.request_id] += out.token_ids
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps = 0
        while eng.has_unfinished():
            for out in eng.step():
                got[out.request_id] += out.token_ids
            steps += 1
        torch.cuda.synchronize()
        secs = time.perf_counter() - start
    finally:
        eng.runner.graphs = graphs
    generated = sum(len(v) - 1 for v in got.values())
    return generated / secs, secs / max(steps, 1), [got[i] for i in ids]


def record_concurrency(quant, n, engine, rate, step_s, cost, peaks, report_figure):
    # A decode step reads the weights once for all n sequences plus each one's K/V.
    nbytes = cost.weight_bytes + n * cost.kv_bytes_per_position * CONC_CONTEXT
    roof = n * peaks.peak_gbps * 1e9 / nbytes if peaks.peak_gbps else None
    row = dict(model=f"synthetic {SHAPE} {quant}", kind="concurrent-decode", engine=engine, concurrency=n,
               context=CONC_CONTEXT, tok_per_s=rate, per_sequence_tok_per_s=rate / n, step_ms=step_s * 1e3,
               gb_per_s=nbytes / step_s / 1e9, roofline_tok_per_s=roof,
               fraction_of_roofline=rate / roof if roof else None)
    RESULTS.setdefault("concurrency", []).append(row)
    line = (f"{SHAPE} {quant:<6} decode {engine:<12} x{n:<3} ctx~{CONC_CONTEXT}  {rate:10.1f} tok/s aggregate  "
            f"{rate / n:7.1f} per sequence  {step_s * 1e3:6.2f} ms/step  {row['gb_per_s']:7.1f} GB/s")
    if roof:
        line += f"  roofline {roof:9.1f} tok/s ({100 * rate / roof:.1f}%)"
    report_figure(line)
    out = results_path()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_e2e.json").write_text(json.dumps(RESULTS, indent=2))
    table = ["| concurrent sequences | engine | aggregate tok/s | per sequence | ms/step | % of roofline |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in RESULTS["concurrency"]:
        frac = f"{100 * r['fraction_of_roofline']:.1f}%" if r["fraction_of_roofline"] else "-"
        table.append(f"| {r['concurrency']} | {r['engine']} | {r['tok_per_s']:,.0f} | "
                     f"{r['per_sequence_tok_per_s']:,.1f} | {r['step_ms']:.2f} | {frac} |")
    (out / "bench_concurrency.md").write_text("\n".join(table) + "\n")


@pytest.mark.parametrize("n", CONCURRENCY)
def test_decode_concurrent_graph(benchmark, engine_rt, peaks, report_figure, n):
    """Aggregate decode tokens/s of n sequences decoding together (CUDA-graph buckets)."""
    quant, rt, cost, runner = engine_rt
    rate, step_s, _ = once(benchmark, lambda: concurrent_decode(rt, n))
    benchmark.extra_info.update(tok_per_s=rate, step_ms=step_s * 1e3, concurrency=n)
    record_concurrency(quant, n, "graph", rate, step_s, cost, peaks, report_figure)


@pytest.mark.parametrize("n", [1, 64])
def test_decode_concurrent_eager(benchmark, engine_rt, peaks, report_figure, n):
    """The same steps on the same Triton kernels without graphs (model.forward)."""
    quant, rt, cost, runner = engine_rt
    rate, step_s, _ = once(benchmark, lambda: concurrent_decode(rt, n, eager=True, tokens=16))
    record_concurrency(quant, n, "triton-eager", rate, step_s, cost, peaks, report_figure)


def test_graph_tokens_equal_eager_tokens(engine_rt):
    """4 greedy sequences: the graph runner's tokens equal the eager forward's (same
    kernels, same padding-free rows; graphs only replay them)."""
    quant, rt, cost, runner = engine_rt
    _, _, graph = concurrent_decode(rt, 4, tokens=16)
    _, _, eager = concurrent_decode(rt, 4, eager=True, tokens=16)
    assert graph == eager
    assert 4 in runner.captured
