"""Host time of one engine decode step, the model replaced by a no-op: what the Python side
(scheduling, batch preparation, sampling, detokenizing) costs per step, which must fit inside
the GPU's ~0.4-1 ms step at 2,000+ tok/s.

    python -m bench.host_step [--batches 1,16,64] [--contexts 192,1024,4096,16384] [--steps 50]

A tiny random SmolLM3-shaped model (1 layer: the KV pool stays small) with the real
SmolLM2 vocabulary size; `batch` prompts of about `context` tokens (lengths staggered over a
KV block, see step_ms); its forward is replaced by one that returns zero logits (one
buffer per row count, allocated once), so only the engine's own work is timed. Three runs:
"host" (greedy, and the sampler replaced by a no-op too: the Python side alone, what must
fit inside a GPU step), "greedy" and "sampled" (temperature 0.7, top-p 0.9) with the
CPU's sampler (on a GPU its work is the device's). Each figure is the median over --steps
decode steps once every sequence is decoding, as CPU time of the stepping thread (on a shared
machine a step that loses its core pays a whole time slice of wall time) and, in
parentheses, wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smollm3_triton.sampling_params import SamplingParams
from tests.helpers.gguf_export import export_gguf, random_hf_model

VOCAB = 49152


def tiny_model(folder: Path) -> Path:
    hf = random_hf_model("smollm3", seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                         max_position_embeddings=32768)
    return export_gguf(hf, folder / "tiny.gguf", "f32")


def step_ms(path: Path, batch: int, context: int, steps: int, params: SamplingParams, no_sampler: bool
            ) -> tuple[float, float]:
    """(CPU ms, wall ms) of a decode step, medians."""
    from smollm3_triton import Runtime

    budget = max(512, min(batch * context, 16384))
    # Prompts are prefilled with what a step's budget leaves after the sequences already
    # decoding (one token each): every sequence must still be running once the last prompt is
    # in (at batch 64 x 16k that takes 65 steps), and then for `steps` more.
    prefill_steps = -(-batch * context // (budget - batch)) + 2
    max_new = prefill_steps + steps + 8
    rt = Runtime.load(path, device="cpu", backend="torch", max_seq_len=context + max_new,
                      kv_cache_tokens=batch * (context + max_new), max_num_seqs=batch, max_num_batched_tokens=budget)
    engine = rt.engine

    zeros: dict[int, torch.Tensor] = {}

    def no_op_forward(b):
        rows = b.logits_rows.shape[0]
        if rows not in zeros:
            zeros[rows] = torch.zeros(rows, VOCAB)
        return zeros[rows]

    engine.runner.forward = no_op_forward
    if no_sampler:
        if hasattr(engine.runner, "sample"):      # one sampling call per step (issue 23's engine)
            engine.runner.sample = lambda logits, logits_rows, rows, state, out: out.zero_()
        else:                                     # main's engine before it: the baseline
            import smollm3_triton.engine.engine as before
            before.sample = lambda logits, states, histories: torch.zeros(len(states), dtype=torch.int64)
    params = dataclasses.replace(params, max_new_tokens=max_new)
    g = torch.Generator().manual_seed(batch + context)
    # Prompts of context - (i mod block_size) tokens: the sequences take their next KV block
    # at different steps, as in real traffic. With equal lengths every sequence's block work
    # (a block allocated, its table entry written, the filled block keyed) falls in the same
    # step, one in block_size, which the median step misses when the prompts went in
    # together (192 tokens: one prefill step) and not when the prefill staggered them (4k
    # on): the figures then rose with context while the work per token did not.
    for i in range(batch):
        engine.add_request(torch.randint(100, VOCAB, (context - i % engine.block_size,), generator=g).tolist(),
                           params)
    for _ in range(prefill_steps):
        if engine.stats().running == batch and all(s.num_computed >= len(s.prompt_ids)
                                                   for s in engine.scheduler.running):
            break
        engine.step()
    else:
        raise RuntimeError(f"batch {batch} x {context}: prompts not all prefilled in {prefill_steps} steps")
    cpu, wall = [], []
    for _ in range(steps):
        c, t = time.thread_time(), time.perf_counter()
        engine.step()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    return 1000 * statistics.median(cpu), 1000 * statistics.median(wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="192,1024,4096,16384")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", default="host,greedy,sampled")
    args = p.parse_args()
    torch.set_num_threads(1)      # OMP_NUM_THREADS=1 too on a shared machine: a pool spinning on busy cores
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_model(Path(tmp))
        batches = [int(b) for b in args.batches.split(",")]
        contexts = [int(c) for c in args.contexts.split(",")]
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        import smollm3_triton
        print(f"host ms per decode step (no-op model, vocab {VOCAB}, 1 torch thread); load {load}; "
              f"engine from {Path(smollm3_triton.__file__).parent.parent}")
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        for name, params, no_sampler in (("host", greedy, True), ("greedy", greedy, False),
                                         ("sampled", SamplingParams(temperature=0.7, top_p=0.9, seed=1,
                                                                    ignore_eos=True), False)):
            if name not in args.runs.split(","):
                continue
            print(f"\n{name:8s} " + " ".join(f"{'ctx ' + str(c):>16s}" for c in contexts))
            for b in batches:
                row = [step_ms(path, b, c, args.steps, params, no_sampler) for c in contexts]
                print(f"batch {b:<3d} " + " ".join(f"{c:7.2f} ({w:6.2f})" for c, w in row), flush=True)
        print("\nload at the end " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
