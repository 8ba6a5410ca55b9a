"""How far the fast CPU path (backend "cpu") is from the exact one, beside llama.cpp's own
distance from the same exact reference, on the real model.

    python bench/cpu_fast_kld.py [--model FILE] [-c 512] [--chunks 4] [--threads N]

Reference: our exact path (backend "torch": the GGUF's weights dequantized exactly to
fp32, fp32 math), which the tests hold to transformers and llama.cpp. Compared with it,
token by token over --chunks chunks of -c tokens of tests/perplexity_data.english_text
(deterministic, no download), each chunk from position 0:
- ours: backend "cpu" (bf16 activations into the int4 kernel, bf16 scales);
- llama.cpp (llama-cpp-python, logits_all) on the same file and token ids: its CPU path
  quantizes activations to 8 bits (Q8_0/Q8_1 dot products) and keeps an F16 KV cache.
Printed: KL(exact || other) mean / 99th percentile / max over the tokens, the largest
logit difference, and how often the top token agrees with the exact path's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from smollm3_triton import Runtime, hub  # noqa: E402
from tests.helpers.perplexity_data import english_text  # noqa: E402


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    return {"kld_mean": float(kld.mean()), "kld_p99": float(kld.quantile(0.99)), "kld_max": float(kld.max()),
            "max_logit_diff": float((ref.double() - other.double()).abs().max()),
            "top1": float((ref.argmax(-1) == other.argmax(-1)).double().mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    path = Path(args.model) if args.model else hub.packaged_smollm2()

    import llama_cpp
    exact = Runtime.load(path, device="cpu", backend="torch", max_seq_len=args.ctx, threads=args.threads)
    fast = Runtime.load(path, device="cpu", backend="cpu", max_seq_len=args.ctx, threads=args.threads)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.ctx, n_batch=args.ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=True, verbose=False)
    tokens = exact.tokenizer.encode(english_text(args.ctx * args.chunks // 2 + 1000, seed=0))
    assert len(tokens) >= args.ctx * args.chunks, len(tokens)
    refs, ours, theirs = [], [], []
    for i in range(args.chunks):
        chunk = tokens[i * args.ctx:(i + 1) * args.ctx]
        refs.append(exact.logits(chunk))
        ours.append(fast.logits(chunk))
        llm.reset()
        llm.eval(chunk)
        theirs.append(torch.from_numpy(np.array(llm.scores[:len(chunk)], dtype=np.float32)))
    ref = torch.cat(refs)
    print(f"model {path.name}: {args.chunks} chunks x {args.ctx} tokens, KL(exact || x) per token")
    print("| vs the exact path | KLD mean | KLD p99 | KLD max | max logit diff | top-1 agrees |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, other in (("ours, backend cpu", torch.cat(ours)), (f"llama.cpp {llama_cpp.__version__}", torch.cat(theirs))):
        r = compare(ref, other)
        print(f"| {name} | {r['kld_mean']:.2e} | {r['kld_p99']:.2e} | {r['kld_max']:.2e} | "
              f"{r['max_logit_diff']:.3f} | {100 * r['top1']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
