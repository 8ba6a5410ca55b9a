"""`smollm3 perplexity`: llama-perplexity's options, and its text output (the `[i]ppl,`
running values, `Final estimate: PPL = x +/- y`, the KLD table and statistics blocks), or
one JSON object. The computing is tools/perplexity.py's."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import RequestError, SourceNotFoundError
from ..tools import DEFAULT_BATCH, DEFAULT_CTX, MIN_CTX
from .options import int_at_least, load_runtime

HELP = "perplexity and KL divergence of a text, as llama-perplexity"
DESCRIPTION = ("Perplexity of a text file in chunks of -c tokens (the second half of each scored), and KL "
               "divergence against a base model, with llama-perplexity's semantics and numbers.")


def add_arguments(p) -> None:
    g = p.add_argument_group("perplexity (llama-perplexity's options)")
    g.add_argument("-f", "--file", metavar="FILE", help="the text to score (not needed with --kl-divergence)")
    g.add_argument("-c", "--ctx-size", dest="ctx", type=int_at_least(MIN_CTX), metavar="N",
                   help=f"tokens per chunk (default: {DEFAULT_CTX}; with --kl-divergence: the base file's)")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=int_at_least(1), default=DEFAULT_BATCH,
                   metavar="N", help=f"tokens per forward batch: batch-size // ctx chunks run together "
                                     f"(default: {DEFAULT_BATCH})")
    g.add_argument("--chunks", type=int, metavar="N", help="score only the first N chunks (default: all)")
    g.add_argument("--kl-divergence-base", metavar="FILE",
                   help="write the model's log-probabilities to FILE (llama.cpp's format); with "
                        "--kl-divergence, read them from FILE instead")
    g.add_argument("--kl-divergence", action="store_true",
                   help="compare this model against --kl-divergence-base FILE: KLD, delta-p, same top p")
    g.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr (default: on)")


def read_text_file(path: str | Path) -> str:
    """The file's text, or a one-line refusal naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path}: no such text file")
    data = path.read_bytes()
    if not data:
        raise RequestError(f"{path} is empty: perplexity needs a text of at least 2 x ctx tokens")
    nul = data.find(b"\0")
    if nul >= 0:
        raise RequestError(f"{path} is a binary file, not text (a NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} "
                           f"is invalid); it looks binary") from None


def run(args) -> int:
    if args.kl_divergence:
        return _run_kld(args)
    if not args.file:
        raise RequestError("no text: pass -f FILE")
    ctx = DEFAULT_CTX if args.ctx is None else args.ctx
    text = read_text_file(args.file)
    from ..tools.perplexity import (
        bos_for_chunks,
        chunks_per_batch,
        n_chunks_of,
        n_seq_of,
        perplexity_of_tokens,
        runtime_logits,
        tokenize,
    )
    from ..tools.progress import Progress

    # A KV pool that holds one batch of chunks (llama.cpp sizes its context the same way).
    rt = load_runtime(args, max_seq_len=max(ctx, args.max_seq_len or 0),
                      kv_cache_tokens=n_seq_of(args.batch_size, ctx) * ctx)
    tokens, add_bos = tokenize(rt, text)
    n_chunk = n_chunks_of(len(tokens), ctx, args.chunks, what=str(args.file))
    n_seq = chunks_per_batch(rt, ctx, args.batch_size)
    print(f"perplexity: {len(tokens)} tokens, {n_chunk} chunks of {ctx} (BOS {'added' if add_bos else 'not added'}), "
          f"batch_size={args.batch_size}, n_seq={n_seq}", file=sys.stderr)
    r = perplexity_of_tokens(runtime_logits(rt), tokens, ctx, bos_id=bos_for_chunks(rt), chunks=args.chunks,
                             batch_size=args.batch_size, base_file=args.kl_divergence_base, n_seq=n_seq,
                             progress=Progress(n_chunk, "perplexity", enabled=args.progress))
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(format_perplexity(r))
    if r.base_file:
        print(f"log-probabilities of {r.n_scored} tokens written to {r.base_file}", file=sys.stderr)
    return 0


def _run_kld(args) -> int:
    from ..tools.kld_base_file import read_base_file
    from ..tools.perplexity import kl_divergence, n_seq_of

    if not args.kl_divergence_base:
        raise RequestError("--kl-divergence needs --kl-divergence-base FILE (written by an earlier run)")
    base = read_base_file(args.kl_divergence_base)
    if args.ctx is not None and args.ctx != base.ctx:
        raise RequestError(f"-c {args.ctx}, but {base.path} was written with a context of {base.ctx}")
    rt = load_runtime(args, max_seq_len=max(base.ctx, args.max_seq_len or 0),
                      kv_cache_tokens=n_seq_of(args.batch_size, base.ctx) * base.ctx)
    if not args.json:
        print(KLD_TABLE_HEADER)

    def on_chunk(row):
        if not args.json:
            print(format_kld_chunk(row), flush=True)
    r = kl_divergence(rt, base.path, chunks=args.chunks, batch_size=args.batch_size, progress=args.progress,
                      on_chunk=on_chunk)
    print(json.dumps(r.to_dict()) if args.json else "\n" + format_kld(r))
    return 0


# --------------------------------------------------------------------------- llama-perplexity's text

KLD_TABLE_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                    "              Δp RMS            Same top p")


def format_kld_chunk(row: dict) -> str:
    p, r, k, d, t = (row[n] for n in ("ppl", "ln_ppl_ratio", "kld", "rms_delta_p", "same_top_p"))
    return (f"{row['chunk']:4d}    {p[0]:9.4f} ± {p[1]:9.4f}    {r[0]:10.5f} ± {r[1]:10.5f}"
            f"    {k[0]:10.5f} ± {k[1]:10.5f}    {100 * d[0]:6.3f} ± {100 * d[1]:6.3f} %"
            f"    {100 * t[0]:6.3f} ± {100 * t[1]:6.3f} %")


def format_perplexity(r) -> str:
    running = "".join(f"[{i + 1}]{v:.4f}," for i, v in enumerate(r.running))
    return f"{running}\nFinal estimate: PPL = {r.ppl:.4f} +/- {r.uncertainty:.5f}"


def format_kld(r) -> str:
    from ..tools.kld import MIN_STATS_TOKENS

    lines = []
    if not r.enough_tokens:
        lines.append(f"warning: only {r.n_scored} scored tokens; llama-perplexity prints no statistics "
                     f"below {MIN_STATS_TOKENS}")
    lines += [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {r.ppl[0]:10.6f} ± {r.ppl[1]:10.6f}",
        f"Mean PPL(base)                : {r.ppl_base[0]:10.6f} ± {r.ppl_base[1]:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * r.cor_ln_ppl:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {r.ln_ppl_ratio[0]:10.6f} ± {r.ln_ppl_ratio[1]:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {r.ppl_ratio[0]:10.6f} ± {r.ppl_ratio[1]:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {r.ppl_diff[0]:10.6f} ± {r.ppl_diff[1]:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {r.kld[0]:10.6f} ± {r.kld[1]:10.6f}",
    ]
    names = {"max": "Maximum", "median": "Median ", "min": "Minimum"}

    def label(k: str, unit: str) -> str:
        return f"{names[k]} {unit}" if k in names else f"{k + '%':>5}   {unit}"

    lines += [f"{label(k, 'KLD')}: {v:10.6f}" for k, v in r.kld_percentiles.items()]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * r.delta_p[0]:6.3f} ± {100 * r.delta_p[1]:5.3f} %"]
    lines += [f"{label(k, 'Δp')}: {100 * v:6.3f}%" for k, v in r.delta_p_percentiles.items()]
    lines += [f"RMS Δp    : {100 * r.rms_delta_p[0]:6.3f} ± {100 * r.rms_delta_p[1]:5.3f} %",
              f"Same top p: {100 * r.same_top_p[0]:6.3f} ± {100 * r.same_top_p[1]:5.3f} %"]
    return "\n".join(lines)
