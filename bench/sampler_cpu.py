"""The CPU's sampler alone (sample_torch in kernels/sampling_reference.py, what a CPU step draws with):
CPU ms per call at batch 64, temperature 0.7, top-p 0.9, seeded rows, on zero logits (every
token tied: the top-p threshold falls inside one run of equal values in every row) and on
random bf16-rounded logits (ties only where bf16 rounding makes them). Prints a digest of the
tokens drawn, so runs of two versions can be checked for the same tokens:

    PYTHONPATH=<other checkout> python <this checkout>/bench/sampler_cpu.py
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--calls", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    import smollm3_triton
    from smollm3_triton.kernels.sampling import SamplingState, sample_torch

    S, V = args.batch, args.vocab
    g = torch.Generator().manual_seed(0)
    print(f"sample_torch ms per call, batch {S}, vocab {V}, T 0.7 top-p 0.9, 1 thread; load "
          f"{os.getloadavg()[0]:.1f}; from {Path(smollm3_triton.__file__).parent.parent}")
    for name, logits in (("zero logits", torch.zeros(S, V)),
                         ("random bf16 logits", (torch.randn(S, V, generator=g) * 3).bfloat16().float())):
        state = SamplingState.allocate(S, V, "cpu")
        state.temperature[:] = 0.7
        state.top_p[:] = 0.9
        state.keys[:] = torch.randint(0, 2**32, (S, 2), generator=torch.Generator().manual_seed(1))
        rows, out = torch.arange(S), torch.empty(S, dtype=torch.int64)
        digest, times = hashlib.sha256(), []
        for _ in range(args.calls):
            t = time.thread_time()
            sample_torch(logits, rows, rows, state, out)
            times.append(time.thread_time() - t)
            digest.update(out.numpy().tobytes())
        print(f"{name:20s} {1000 * statistics.median(times):7.1f} ms (median of {args.calls}); "
              f"tokens {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
