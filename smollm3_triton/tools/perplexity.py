"""Perplexity and KL divergence over a text's chunks, with the semantics of llama.cpp's
`llama-perplexity` (tools/perplexity/perplexity.cpp):

- The whole text is tokenised once, a BOS first when the vocabulary adds one
  (Tokenizer.adds_bos: llama_vocab_get_add_bos). It must give at least 2 * ctx tokens;
  it is cut into floor(n / ctx) chunks of ctx tokens (the tail is dropped; `chunks`
  keeps the first N).
- Every chunk is evaluated from position 0 with its first token replaced by BOS when
  the vocabulary adds BOS. Only the second half is scored: with first = ctx // 2 the
  logits of positions first .. ctx-2 predict tokens first+1 .. ctx-1 (ctx - 1 - first
  tokens per chunk: 255 at 512).
- PPL = exp(mean NLL); its uncertainty is PPL * sqrt((E[nll^2] - E[nll]^2) / (N - 1)),
  and the running value after each chunk is kept (llama-perplexity's `[i]ppl,`).
- kl_divergence_base=FILE also writes llama.cpp's base file (tools/kld_base_file.py);
  kl_divergence() reads the tokens and ctx from such a file, evaluates this model on the
  same chunks and computes tools/kld.py's statistics.

Chunks go through `Runtime.logits` batch_size // ctx at a time (llama.cpp's n_seq);
by batch invariance the numbers do not depend on the batch size.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ModelFormatError, RequestError
from . import DEFAULT_BATCH, DEFAULT_CTX, MIN_CTX
from .kld import KLDResult, KLDSums
from .kld_base_file import BaseFileWriter, decode_rows, read_base_file, scored_rows
from .progress import Progress

LogitsFn = Callable[[list[list[int]]], Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- inputs and chunks

def _check_text(text) -> None:
    if not isinstance(text, str):
        raise RequestError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise RequestError("text is empty: perplexity needs a text of at least 2 x ctx tokens")
    if "\0" in text:
        raise RequestError(f"text holds a NUL character at offset {text.index(chr(0))}: binary data, not text")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_ctx(rt, ctx: int) -> int:
    _check_int("ctx", ctx, MIN_CTX)
    limit = rt.model.max_seq_len
    if ctx > limit:
        raise RequestError(f"ctx {ctx} is longer than the context of {limit} tokens this runtime was "
                           f"loaded with (max_seq_len)")
    return ctx


def bos_for_chunks(rt) -> int | None:
    """The BOS id each chunk starts with, or None when the vocabulary adds no BOS."""
    if not rt.tokenizer.adds_bos:
        return None
    if rt.tokenizer.bos_id is None:
        raise ModelFormatError(f"{rt.source}: the vocabulary adds BOS but has no BOS token id")
    return rt.tokenizer.bos_id


def tokenize(rt, text: str) -> tuple[list[int], bool]:
    """llama-perplexity's tokens of the whole text (common_tokenize with add_special):
    BOS first when the vocabulary adds it. -> (tokens, add_bos)."""
    _check_text(text)
    bos = bos_for_chunks(rt)
    return ([] if bos is None else [bos]) + rt.tokenizer.encode(text), bos is not None


def n_chunks_of(n_tokens: int, ctx: int, chunks: int | None = None, what: str = "the text") -> int:
    """floor(n / ctx) chunks (at most `chunks`); refuses fewer than 2 * ctx tokens as llama.cpp does."""
    if n_tokens < 2 * ctx:
        raise RequestError(f"{what} tokenizes to only {n_tokens} tokens; perplexity with a context of {ctx} "
                           f"needs at least {2 * ctx} (2 x ctx): use a longer text or a smaller -c")
    n = n_tokens // ctx
    return n if chunks is None or chunks < 0 else min(chunks, n)


def chunk_input(tokens: Sequence[int], i: int, ctx: int, bos_id: int | None) -> list[int]:
    """Chunk i as evaluated: tokens[i*ctx:(i+1)*ctx], its first replaced by BOS when given."""
    ids = list(tokens[i * ctx:(i + 1) * ctx])
    if bos_id is not None:
        ids[0] = bos_id
    return ids


def runtime_logits(rt) -> LogitsFn:
    """Logits of several chunks: rt.logits(list) runs them as one batch through the engine."""
    return lambda chunks: rt.logits(chunks)


def n_seq_of(batch_size: int, ctx: int) -> int:
    """llama.cpp's n_seq: chunks per forward batch."""
    _check_int("batch_size", batch_size, 1)
    return max(1, batch_size // ctx)


def chunks_per_batch(rt, ctx: int, batch_size: int) -> int:
    """n_seq cut to what the engine's free KV blocks hold (the numbers do not depend on
    it: batch invariance)."""
    n_seq = n_seq_of(batch_size, ctx)
    per_chunk = -(-ctx // rt.engine.block_size)
    return max(1, min(n_seq, rt.engine.stats().free_blocks // per_chunk))


def _scored_chunks(logits_fn: LogitsFn, tokens: Sequence[int], ctx: int, n_chunk: int, n_seq: int,
                   bos_id: int | None) -> Iterator[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Per batch of n_seq chunks: (chunk indices, [(scored logits rows, their target tokens)])."""
    first, _ = scored_rows(ctx)
    for i0 in range(0, n_chunk, n_seq):
        idx = list(range(i0, min(i0 + n_seq, n_chunk)))
        outs = list(logits_fn([chunk_input(tokens, i, ctx, bos_id) for i in idx]))
        if len(outs) != len(idx):
            raise RuntimeError(f"logits for {len(idx)} chunks returned {len(outs)}")
        scored = []
        for i, logits in zip(idx, outs):
            if logits.shape[0] != ctx:
                raise RuntimeError(f"chunk {i}: {logits.shape[0]} logits rows for {ctx} tokens")
            targets = torch.tensor(tokens[i * ctx + first + 1:(i + 1) * ctx], dtype=torch.int64,
                                   device=logits.device)
            scored.append((logits[first:ctx - 1], targets))
        yield idx, scored


def _nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(rows)[target] per row, float64 (llama.cpp: float logits, double sum)."""
    lf = rows.double()
    return torch.logsumexp(lf, dim=-1) - lf.gather(1, targets[:, None]).squeeze(1)


# --------------------------------------------------------------------------- perplexity

@dataclass
class PerplexityResult:
    ppl: float                      # exp(mean NLL) over every scored token
    uncertainty: float              # PPL * standard error of the mean NLL
    ctx: int
    n_chunks: int
    n_tokens: int                   # tokens of the whole text (BOS included)
    n_scored: int                   # n_chunks * (ctx - 1 - ctx // 2)
    add_bos: bool
    batch_size: int
    running: list[float]            # PPL after each chunk: llama-perplexity's [i]x values
    nll: np.ndarray = field(repr=False)   # float64 [n_scored], -log p(token), chunk after chunk
    seconds: float = 0.0
    base_file: str | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "nll"}
        d["mode"] = "perplexity"
        return d


def perplexity_of_tokens(logits_fn: LogitsFn, tokens: Sequence[int], ctx: int, *, bos_id: int | None,
                         chunks: int | None = None, batch_size: int = DEFAULT_BATCH,
                         base_file: str | Path | None = None, progress: Progress | None = None,
                         n_seq: int | None = None) -> PerplexityResult:
    """llama-perplexity on already-tokenised text (BOS, if any, already first; bos_id: the
    id each chunk starts with, None for none); n_seq chunks per logits_fn call (default
    batch_size // ctx). base_file: also write llama.cpp's base file there."""
    n_chunk = n_chunks_of(len(tokens), ctx, chunks)
    n_seq = n_seq_of(batch_size, ctx) if n_seq is None else n_seq
    t0 = time.perf_counter()
    nlls, running = [], []
    total = total2 = 0.0
    count = 0
    bar = progress or Progress(n_chunk, "perplexity", enabled=False)
    writing = nullcontext() if base_file is None else BaseFileWriter(base_file, ctx, n_chunk, tokens)
    with bar, writing as writer:
        for idx, scored in _scored_chunks(logits_fn, tokens, ctx, n_chunk, n_seq, bos_id):
            for rows, targets in scored:
                nll = (_nll(rows, targets) if writer is None else writer.add(rows, targets)).cpu()
                nlls.append(nll.numpy())
                total += float(nll.sum())
                total2 += float((nll * nll).sum())
                count += len(nll)
                running.append(math.exp(total / count))
            bar.update(len(idx), f"PPL {running[-1]:.4f}")
    mean, mean2 = total / count, total2 / count
    ppl = math.exp(mean)
    var = mean2 - mean * mean
    unc = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl=ppl, uncertainty=unc, ctx=ctx, n_chunks=n_chunk, n_tokens=len(tokens),
                            n_scored=count, add_bos=bos_id is not None, batch_size=batch_size, running=running,
                            nll=np.concatenate(nlls), seconds=time.perf_counter() - t0,
                            base_file=None if base_file is None else str(base_file))


def perplexity(rt, text: str, ctx: int = DEFAULT_CTX, *, chunks: int | None = None,
               batch_size: int = DEFAULT_BATCH, kl_divergence_base: str | Path | None = None,
               progress: bool = False, logits_fn: LogitsFn | None = None) -> PerplexityResult:
    """llama-perplexity's PPL of `text` under the model of `rt` (see the module docstring).
    kl_divergence_base: also write the base file a later kl_divergence() compares against."""
    _check_ctx(rt, ctx)
    tokens, _ = tokenize(rt, text)
    n_chunk = n_chunks_of(len(tokens), ctx, chunks)
    return perplexity_of_tokens(logits_fn or runtime_logits(rt), tokens, ctx, bos_id=bos_for_chunks(rt),
                                chunks=chunks, batch_size=batch_size, base_file=kl_divergence_base,
                                progress=Progress(n_chunk, "perplexity", enabled=progress),
                                n_seq=chunks_per_batch(rt, ctx, batch_size))


# --------------------------------------------------------------------------- KL divergence

def kl_divergence(rt, base_file: str | Path, *, chunks: int | None = None, batch_size: int = DEFAULT_BATCH,
                  progress: bool = False, logits_fn: LogitsFn | None = None,
                  on_chunk: Callable[[dict], None] | None = None) -> KLDResult:
    """llama-perplexity --kl-divergence: this model against the base file's log-probabilities.
    on_chunk(row): called with the running figures after each chunk (KLDSums.running)."""
    base = read_base_file(base_file)
    ctx = _check_ctx(rt, base.ctx)
    bos_id = bos_for_chunks(rt)
    n_chunk = base.n_chunk if chunks is None or chunks < 0 else min(chunks, base.n_chunk)
    if int(base.tokens.max(initial=0)) >= rt.config.vocab_size or int(base.tokens.min(initial=0)) < 0:
        raise RequestError(f"{base.path}: token ids outside this model's vocabulary of {rt.config.vocab_size}")
    sums = KLDSums()
    klds, pdiffs, chunk_rows = [], [], []
    t0 = time.perf_counter()
    with Progress(n_chunk, "kl-divergence", enabled=progress) as bar:
        for idx, scored in _scored_chunks(logits_fn or runtime_logits(rt), base.tokens.tolist(), ctx, n_chunk,
                                          chunks_per_batch(rt, ctx, batch_size), bos_id):
            for i, (rows, targets) in zip(idx, scored):
                if rows.shape[1] != base.n_vocab:
                    raise RequestError(f"{base.path} was written with a vocabulary of {base.n_vocab}; "
                                       f"this model's logits have {rows.shape[1]}")
                kld, p_diff = sums.add(rows, targets, decode_rows(base.chunk_rows(i), base.n_vocab, rows.device))
                klds.append(kld)
                pdiffs.append(p_diff)
                chunk_rows.append(sums.running(i + 1))
                if on_chunk is not None:
                    on_chunk(chunk_rows[-1])
            bar.update(len(idx), f"KLD {chunk_rows[-1]['kld'][0]:.5f}")
    return KLDResult.from_sums(sums, np.concatenate(klds), np.concatenate(pdiffs), chunk_rows, ctx=ctx,
                               add_bos=bos_id is not None, base_file=str(base.path),
                               seconds=time.perf_counter() - t0)
