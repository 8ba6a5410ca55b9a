"""Greedy agreement with the exact path: on how many of 22 prompts the cpu backend's 32
greedy tokens equal the exact path's (backend "torch"), beside llama.cpp's count on the same
file and token ids.

    python -m bench.cpu_fast_greedy [--model FILE] [--tokens 32] [--threads N]

Prompts: 12 raw continuations and 10 chat questions (rendered with the model's template).
Two paths part where two candidates' logits are within the paths' error of each other; a
count says how often that happens in 32 tokens, not which path is right.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smollm3_triton import Runtime, hub
from smollm3_triton.sampling_params import SamplingParams

RAW = ["The capital of France is", "The three primary colours are", "The largest planet in the solar system is",
       "Here is a list of fruits: apple,", "My favourite book is", "Water boils at", "def fibonacci(n):",
       "Once upon a time, in a small village,", "The first step in making bread is",
       "In 1969, the first humans", "The speed of light is", "1, 2, 3, 4, 5,"]
QUESTIONS = ["What is the capital of France?", "How do I boil an egg?", "Write a haiku about the sea.",
             "What is 12 times 7?", "Name three mammals that live in the ocean.", "Why is the sky blue?",
             "Give me a tip for learning Python.", "What is photosynthesis?", "Translate 'good morning' to French.",
             "Summarise the plot of Romeo and Juliet in one sentence."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    path = Path(args.model) if args.model else hub.packaged_smollm2()

    import llama_cpp
    exact = Runtime.load(path, device="cpu", backend="torch", max_seq_len=512, threads=args.threads)
    fast = Runtime.load(path, device="cpu", backend="cpu", max_seq_len=512, threads=args.threads)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    prompts = [exact.tokenizer.encode(p) for p in RAW]
    prompts += [exact.tokenizer.encode(exact.render_chat([{"role": "user", "content": q}])) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def greedy(rt):
        return [[t for o in outs for t in o.token_ids] for outs in rt.engine.run([(p, params) for p in prompts])]

    ref, ours = greedy(exact), greedy(fast)
    theirs = []
    for p in prompts:
        llm.reset()
        gen = llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        theirs.append([t for t, _ in zip(gen, range(args.tokens))])
    print(f"model {path.name}: {len(prompts)} prompts ({len(RAW)} raw, {len(QUESTIONS)} chat), "
          f"{args.tokens} greedy tokens each; equal to the exact path on all of them:")
    for name, got in (("ours, backend cpu", ours), (f"llama.cpp {llama_cpp.__version__}", theirs)):
        same = [i for i, (a, b) in enumerate(zip(ref, got)) if a == b]
        first = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ref, got)]
        print(f"{name}: {len(same)} of {len(prompts)}; first differing token per prompt: {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
