"""Perplexity and KL divergence with the semantics of llama.cpp's `llama-perplexity`.

    smollm3 perplexity --model M.gguf -f wiki.test.raw [-c 512] [-b 2048] [--chunks N]
    smollm3 perplexity --model F16.gguf  -f text -c 512 --kl-divergence-base base.kld
    smollm3 perplexity --model Q4KM.gguf --kl-divergence-base base.kld --kl-divergence

What is computed, as tools/perplexity/perplexity.cpp does it:

- The whole text is tokenised once (a BOS first when the vocabulary adds one:
  `tokenizer.ggml.add_bos_token`, else llama.cpp's default for the pre-tokenizer).
  It must give at least 2 * ctx tokens; it is cut into floor(n / ctx) chunks of ctx
  tokens (the tail is dropped; --chunks keeps the first N).
- Every chunk is evaluated from position 0 with its first token replaced by BOS when
  the vocabulary adds BOS. Only the second half is scored: with first = ctx // 2 the
  logits of positions first .. ctx-2 predict tokens first+1 .. ctx-1 (ctx - 1 - first
  tokens per chunk: 255 at 512).
- PPL = exp(mean NLL); its uncertainty is PPL * sqrt((E[nll^2] - E[nll]^2) / (N - 1)).
  The running value after each chunk is printed as `[i]ppl,`.
- --kl-divergence-base FILE writes llama.cpp's own base-file format, the full
  vocabulary for every scored token (so files written here are read by
  llama-perplexity and the other way round): b"_logits_", uint32 n_ctx, int32 n_vocab,
  int32 n_chunk, int32 tokens[n_chunk * n_ctx], then per scored token nv = 2*ceil(n_vocab/2)+4
  uint16 values: float32 scale and float32 min_log_prob (4 uint16), then each logit as
  round((logit - min_logit) / scale), min_logit = max(min, max - 16), scale = (max - min_logit) / 65535.
  That is 2 bytes per vocabulary entry per token (~25 MB per 512-token chunk at a 49152 vocabulary).
- --kl-divergence reads the tokens and ctx from that file, evaluates the model on the
  same chunks and reports, per chunk and in total: PPL(Q), ln(PPL(Q)/PPL(base)), mean
  KLD(base || Q) with its uncertainty, RMS of delta-p (p_Q(token) - p_base(token)) and
  "Same top p" (top-1 agreement), then KLD and delta-p percentiles.
  As llama.cpp, statistics over fewer than 100 tokens are flagged as too few.

Chunks go through `Runtime.logits` batch_size // ctx at a time (llama.cpp's n_seq);
by batch invariance the numbers do not depend on the batch size.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ModelFormatError, RequestError, SourceNotFoundError

DEFAULT_CTX = 512
DEFAULT_BATCH = 2048            # tokens per forward call, llama-perplexity's -b default
BASE_MAGIC = b"_logits_"
MIN_STATS_TOKENS = 100          # llama.cpp prints no KLD statistics below this

# Pre-tokenizers (tokenizer.ggml.pre) for which llama.cpp's vocab adds BOS when the file
# has no tokenizer.ggml.add_bos_token key (src/llama-vocab.cpp, BPE branch).
_BPE_PRE_ADDING_BOS = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                 "midm-2.0", "lfm2", "jina-v5-nano", "tekken", "chameleon"})

LogitsFn = Callable[[list[list[int]]], Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- inputs

def vocab_adds_bos(rt) -> bool:
    """Whether llama.cpp's vocabulary for this model adds BOS (llama_vocab_get_add_bos)."""
    source = Path(rt.source)
    if source.is_dir():
        return _hf_adds_bos(source)
    from ..gguf.reader import GGUFFile
    with GGUFFile(source) as g:
        md = g.metadata
    value = md.get("tokenizer.ggml.add_bos_token")
    if isinstance(value, bool):
        return value
    model = md.get("tokenizer.ggml.model")
    if model == "llama":      # SPM
        return True
    return model == "gpt2" and md.get("tokenizer.ggml.pre") in _BPE_PRE_ADDING_BOS


def _hf_adds_bos(folder: Path) -> bool:
    """convert_hf_to_gguf's reading: tokenizer_config.json add_bos_token, else whether
    tokenizer.json's post-processor puts the BOS token in front of a single sequence."""
    cfg_file = folder / "tokenizer_config.json"
    config = {}
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{cfg_file}: invalid JSON: {e}") from None
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    try:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    post = spec.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing" and bos is not None:
            single = p.get("single") or []
            first = single[0] if single else {}
            if (first.get("SpecialToken") or {}).get("id") == bos:
                return True
    return False


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


def tokenize(rt, text: str) -> tuple[list[int], bool]:
    """llama-perplexity's tokens of the whole text (common_tokenize with add_special):
    BOS first when the vocabulary adds it. -> (tokens, add_bos)."""
    _check_text(text)
    add_bos = vocab_adds_bos(rt)
    if add_bos and rt.tokenizer.bos_id is None:
        raise ModelFormatError(f"{rt.source}: the vocabulary adds BOS but has no BOS token id")
    tokens = rt.tokenizer.encode(text)
    return ([rt.tokenizer.bos_id] if add_bos else []) + tokens, add_bos


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


def chunks_per_batch(rt, ctx: int, batch_size: int) -> int:
    """llama.cpp's n_seq = batch_size // ctx (at least 1), cut to what the engine's free
    KV blocks hold (the numbers do not depend on it: batch invariance)."""
    n_seq = _n_seq(batch_size, ctx)
    engine = getattr(rt, "engine", None)
    if engine is not None:
        per_chunk = -(-ctx // engine.block_size)
        n_seq = max(1, min(n_seq, engine.stats().free_blocks // per_chunk))
    return n_seq


# --------------------------------------------------------------------------- progress

class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per update elsewhere."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        width = 30
        filled = round(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        line = (f"{self.label} [{bar}] {self.done}/{self.total} chunks, {elapsed:.1f} s, "
                f"ETA {eta:.1f} s{', ' + note if note else ''}")
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- per-chunk math

def _nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(rows)[target] per row, float64 (llama.cpp: float logits, double sum)."""
    lf = rows.double()
    return torch.logsumexp(lf, dim=-1) - lf.gather(1, targets[:, None]).squeeze(1)


def quantize_log_probs(rows: torch.Tensor, targets: torch.Tensor, nv: int) -> tuple[np.ndarray, torch.Tensor]:
    """llama.cpp's base-file rows of float32 logits [n, V]: uint16 [n, nv] (scale and
    min_log_prob as float32 in the first 4, then the scaled logits) and the NLL of the
    targets as llama.cpp computes it while writing (float32)."""
    rows = rows.float()
    n, V = rows.shape
    mx = rows.max(dim=-1).values
    mn = torch.maximum(rows.min(dim=-1).values, mx - 16)
    sum_exp = torch.exp(rows - mx[:, None]).double().sum(dim=-1)
    lse = torch.log(sum_exp).float()
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / 65535.0
    inv = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    q = torch.round(inv[:, None] * (rows - mn[:, None]))
    q = torch.where(rows > mn[:, None], q, 0.0).to(torch.int32) & 0xFFFF   # C's uint16 store wraps
    out = np.zeros((n, nv), dtype=np.uint16)
    header = torch.stack([scale, min_log_prob], dim=1).cpu().numpy().astype("<f4")
    out[:, :4] = header.view("<u2").reshape(n, 4)
    out[:, 4:4 + V] = q.cpu().numpy().astype(np.uint16)
    nll = (mx + lse) - rows.gather(1, targets[:, None]).squeeze(1)
    return out, nll.double()


@dataclass
class _Moments:
    """Sums of values and of their squares, in double as llama.cpp accumulates them."""
    total: float = 0.0
    total2: float = 0.0

    def add(self, x: torch.Tensor, x2: torch.Tensor) -> None:
        """x2: the squares as llama.cpp rounds them (a float32 product for float32 values)."""
        self.total += float(x.double().sum())
        self.total2 += float(x2.double().sum())

    def mean_and_uncertainty(self, count: int) -> tuple[float, float]:
        if count < 1:
            return 0.0, 0.0
        f = self.total / count
        df = self.total2 / count - f * f
        return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


@dataclass
class _KLDSums:
    nll: _Moments = field(default_factory=_Moments)         # -log p_Q(token)
    nll_base: _Moments = field(default_factory=_Moments)    # -log p_base(token)
    kld: _Moments = field(default_factory=_Moments)
    p_diff: _Moments = field(default_factory=_Moments)      # p_Q(token) - p_base(token)
    p_diff2: _Moments = field(default_factory=_Moments)     # its square: RMS delta-p and its uncertainty
    nll_nll_base: float = 0.0                               # for Cov(ln PPL(Q), ln PPL(base))
    n_same_top: int = 0
    count: int = 0

    def nll_covariance(self) -> float:
        """llama.cpp's covariance of the two mean NLLs (ln PPL(Q) and ln PPL(base))."""
        n = self.count
        if n < 10:
            return 0.0
        return (self.nll_nll_base / n - (self.nll.total / n) * (self.nll_base.total / n)) / (n - 1)


def _kld_rows(rows: torch.Tensor, targets: torch.Tensor, base: np.ndarray, sums: _KLDSums):
    """llama.cpp's per-token KLD(base || Q), delta-p and top-1 agreement for rows [n, V]
    against base-file rows [n, nv]; adds to sums; -> (kld [n], p_diff [n]) float32 numpy."""
    rows = rows.float()
    n, V = rows.shape
    dev = rows.device
    header = np.ascontiguousarray(base[:, :4]).view("<f4").reshape(n, 2)
    scale = torch.from_numpy(header[:, 0].astype(np.float32)).to(dev)
    min_log_prob = torch.from_numpy(header[:, 1].astype(np.float32)).to(dev)
    q = torch.from_numpy(base[:, 4:4 + V].astype(np.int32)).to(dev)

    mx = rows.max(dim=-1).values
    imax = rows.argmax(dim=-1)
    lse = torch.log(torch.exp(rows - mx[:, None]).double().sum(dim=-1)).float()
    p_log_base = scale[:, None] * q.float() + min_log_prob[:, None]
    nll = (mx + lse) - rows.gather(1, targets[:, None]).squeeze(1)
    nll_base = -p_log_base.gather(1, targets[:, None]).squeeze(1)
    m = mx + lse
    terms = torch.where(p_log_base > -16.0, torch.exp(p_log_base) * (p_log_base - rows + m[:, None]), 0.0)
    kld = terms.double().sum(dim=-1)
    imax_base = p_log_base.argmax(dim=-1)
    p_diff = torch.exp(-nll) - torch.exp(-nll_base)

    p_diff2 = (p_diff * p_diff).double()
    sums.nll.add(nll, nll * nll)
    sums.nll_base.add(nll_base, nll_base * nll_base)
    sums.nll_nll_base += float((nll * nll_base).double().sum())
    sums.kld.add(kld, kld * kld)
    sums.p_diff.add(p_diff, p_diff2)
    sums.p_diff2.add(p_diff2, p_diff2 * p_diff2)
    sums.n_same_top += int((imax == imax_base).sum())
    sums.count += n
    return kld.float().cpu().numpy(), p_diff.cpu().numpy()


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear interpolation between order statistics (float32 arithmetic)."""
    v = sorted_values
    fraction = np.float32(fraction)
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction * np.float32(len(v) - 1))
    ip = int(p)
    p = np.float32(p - ip)
    return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def _median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    if n % 2 == 0:
        return float(np.float32(0.5) * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


# --------------------------------------------------------------------------- results

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


@dataclass
class KLDResult:
    ctx: int
    n_chunks: int
    n_scored: int
    add_bos: bool
    base_file: str
    ppl: tuple[float, float]                 # PPL(Q) and its uncertainty
    ppl_base: tuple[float, float]
    cor_ln_ppl: float                        # Cor(ln PPL(Q), ln PPL(base))
    ln_ppl_ratio: tuple[float, float]
    ppl_ratio: tuple[float, float]
    ppl_diff: tuple[float, float]
    kld: tuple[float, float]                 # mean KLD(base || Q) and its uncertainty
    kld_percentiles: dict[str, float]        # "max", "99.9", ..., "median", ..., "min"
    delta_p: tuple[float, float]             # mean p_Q - p_base of the text's token
    delta_p_percentiles: dict[str, float]
    rms_delta_p: tuple[float, float]
    same_top_p: tuple[float, float]          # fraction of tokens whose top-1 agrees
    chunks: list[dict]                       # per-chunk running values as llama.cpp prints them
    kld_values: np.ndarray = field(repr=False)
    p_diff_values: np.ndarray = field(repr=False)
    seconds: float = 0.0

    @property
    def enough_tokens(self) -> bool:
        return self.n_scored >= MIN_STATS_TOKENS

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("kld_values", "p_diff_values")}
        d["mode"] = "kl-divergence"
        d["enough_tokens_for_statistics"] = self.enough_tokens
        return d


# --------------------------------------------------------------------------- drivers

def _batches(n_chunk: int, n_seq: int):
    for i0 in range(0, n_chunk, n_seq):
        yield list(range(i0, min(i0 + n_seq, n_chunk)))


def _n_seq(batch_size: int, ctx: int) -> int:
    _check_int("batch_size", batch_size, 1)
    return max(1, batch_size // ctx)


def _check_ctx(rt, ctx: int) -> int:
    _check_int("ctx", ctx, 3)      # at least one scored token per chunk
    limit = rt.model.max_seq_len
    if ctx > limit:
        raise RequestError(f"ctx {ctx} is longer than the context of {limit} tokens this runtime was "
                           f"loaded with (max_seq_len)")
    return ctx


def _chunk_logits(logits_fn: LogitsFn, tokens, idx, ctx, bos_id):
    inputs = [chunk_input(tokens, i, ctx, bos_id) for i in idx]
    outs = list(logits_fn(inputs))
    if len(outs) != len(inputs):
        raise RuntimeError(f"logits for {len(inputs)} chunks returned {len(outs)}")
    return outs


def perplexity_of_tokens(logits_fn: LogitsFn, tokens: Sequence[int], ctx: int, *, bos_id: int | None,
                         chunks: int | None = None, batch_size: int = DEFAULT_BATCH,
                         base_file: str | Path | None = None, progress: Progress | None = None,
                         add_bos: bool = False, n_seq: int | None = None) -> PerplexityResult:
    """llama-perplexity on already-tokenised text (BOS, if any, already first); n_seq chunks
    per logits_fn call (default batch_size // ctx)."""
    n_chunk = n_chunks_of(len(tokens), ctx, chunks)
    n_seq = _n_seq(batch_size, ctx) if n_seq is None else n_seq
    first = ctx // 2
    n_per = ctx - 1 - first
    t0 = time.perf_counter()
    out = None
    nv = None
    if base_file is not None:
        out = open(base_file, "wb")
    try:
        nlls, running = [], []
        total = total2 = 0.0
        count = 0
        for idx in _batches(n_chunk, n_seq):
            outs = _chunk_logits(logits_fn, tokens, idx, ctx, bos_id)
            for i, logits in zip(idx, outs):
                if logits.shape[0] != ctx:
                    raise RuntimeError(f"chunk {i}: {logits.shape[0]} logits rows for {ctx} tokens")
                rows = logits[first:ctx - 1]
                targets = torch.tensor(tokens[i * ctx + first + 1:(i + 1) * ctx], dtype=torch.int64,
                                       device=rows.device)
                if out is not None:
                    if nv is None:
                        n_vocab = logits.shape[1]
                        nv = 2 * ((n_vocab + 1) // 2) + 4
                        out.write(BASE_MAGIC)
                        out.write(np.array([ctx], "<u4").tobytes())
                        out.write(np.array([n_vocab, n_chunk], "<i4").tobytes())
                        out.write(np.asarray(tokens[:n_chunk * ctx], "<i4").tobytes())
                    q, nll = quantize_log_probs(rows, targets, nv)
                    out.write(q.tobytes())
                else:
                    nll = _nll(rows, targets)
                nll = nll.cpu()
                nlls.append(nll.numpy())
                total += float(nll.sum())
                total2 += float((nll * nll).sum())
                count += n_per
                running.append(math.exp(total / count))
            if progress is not None:
                progress.update(len(idx), f"PPL {running[-1]:.4f}")
    except BaseException:
        if out is not None:
            out.close()
            Path(base_file).unlink(missing_ok=True)     # no half-written base file left behind
        raise
    finally:
        if out is not None:
            out.close()
        if progress is not None:
            progress.close()
    mean, mean2 = total / count, total2 / count
    ppl = math.exp(mean)
    var = mean2 - mean * mean
    unc = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl=ppl, uncertainty=unc, ctx=ctx, n_chunks=n_chunk, n_tokens=len(tokens),
                            n_scored=count, add_bos=add_bos, batch_size=batch_size, running=running,
                            nll=np.concatenate(nlls), seconds=time.perf_counter() - t0,
                            base_file=None if base_file is None else str(base_file))


def perplexity(rt, text: str, ctx: int = DEFAULT_CTX, *, chunks: int | None = None,
               batch_size: int = DEFAULT_BATCH, kl_divergence_base: str | Path | None = None,
               progress: bool = False, logits_fn: LogitsFn | None = None) -> PerplexityResult:
    """llama-perplexity's PPL of `text` under the model of `rt` (see the module docstring).
    kl_divergence_base: also write the base file a later kl_divergence() compares against."""
    _check_ctx(rt, ctx)
    tokens, add_bos = tokenize(rt, text)
    n_chunk = n_chunks_of(len(tokens), ctx, chunks)
    bar = Progress(n_chunk, "perplexity", enabled=progress)
    return perplexity_of_tokens(logits_fn or runtime_logits(rt), tokens, ctx,
                                bos_id=rt.tokenizer.bos_id if add_bos else None, chunks=chunks,
                                batch_size=batch_size, base_file=kl_divergence_base, progress=bar,
                                add_bos=add_bos, n_seq=chunks_per_batch(rt, ctx, batch_size))


@dataclass
class BaseFile:
    path: Path
    ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray       # int32 [n_chunk * ctx]
    rows: np.ndarray         # uint16 memmap [n_chunk * (ctx - 1 - ctx // 2), nv]


def read_base_file(path: str | Path) -> BaseFile:
    """A llama.cpp `--kl-divergence-base` file, checked against its own header."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path}: no such base file (write one with --kl-divergence-base "
                                  f"and no --kl-divergence)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != BASE_MAGIC:
        raise RequestError(f"{path} does not look like a file of log-probabilities (no {BASE_MAGIC!r} header)")
    ctx = int(np.frombuffer(head, "<u4", 1, 8)[0])
    n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, "<i4", 2, 12))
    if ctx < 3 or n_vocab < 1 or n_chunk < 1:
        raise RequestError(f"{path}: bad header (n_ctx {ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_rows = n_chunk * (ctx - 1 - ctx // 2)
    want = 20 + 4 * n_chunk * ctx + 2 * nv * n_rows
    if size != want:
        raise RequestError(f"{path}: {size} bytes, but its header (n_ctx {ctx}, n_vocab {n_vocab}, "
                           f"{n_chunk} chunks) needs {want}: truncated or not a base file")
    tokens = np.fromfile(path, "<i4", n_chunk * ctx, offset=20)
    rows = np.memmap(path, "<u2", "r", offset=20 + 4 * n_chunk * ctx, shape=(n_rows, nv))
    return BaseFile(path, ctx, n_vocab, n_chunk, tokens, rows)


def kl_divergence(rt, base_file: str | Path, *, chunks: int | None = None, batch_size: int = DEFAULT_BATCH,
                  progress: bool = False, logits_fn: LogitsFn | None = None,
                  on_chunk: Callable[[dict], None] | None = None) -> KLDResult:
    """llama-perplexity --kl-divergence: this model against the base file's log-probabilities."""
    base = read_base_file(base_file)
    ctx = base.ctx
    _check_ctx(rt, ctx)
    add_bos = vocab_adds_bos(rt)
    bos_id = rt.tokenizer.bos_id if add_bos else None
    n_chunk = base.n_chunk if chunks is None or chunks < 0 else min(chunks, base.n_chunk)
    if int(base.tokens.max(initial=0)) >= rt.config.vocab_size or int(base.tokens.min(initial=0)) < 0:
        raise RequestError(f"{base.path}: token ids outside this model's vocabulary of {rt.config.vocab_size}")
    first = ctx // 2
    n_per = ctx - 1 - first
    n_seq = chunks_per_batch(rt, ctx, batch_size)
    fn = logits_fn or runtime_logits(rt)
    tokens = base.tokens.tolist()
    bar = Progress(n_chunk, "kl-divergence", enabled=progress)
    sums = _KLDSums()
    klds, pdiffs, rows_out = [], [], []
    t0 = time.perf_counter()
    try:
        for idx in _batches(n_chunk, n_seq):
            outs = _chunk_logits(fn, tokens, idx, ctx, bos_id)
            for i, logits in zip(idx, outs):
                if logits.shape[1] != base.n_vocab:
                    raise RequestError(f"{base.path} was written with a vocabulary of {base.n_vocab}; "
                                       f"this model's logits have {logits.shape[1]}")
                rows = logits[first:ctx - 1]
                targets = torch.tensor(tokens[i * ctx + first + 1:(i + 1) * ctx], dtype=torch.int64,
                                       device=rows.device)
                kld, pd = _kld_rows(rows, targets, np.asarray(base.rows[i * n_per:(i + 1) * n_per]), sums)
                klds.append(kld)
                pdiffs.append(pd)
                row = _chunk_row(i + 1, sums)
                rows_out.append(row)
                if on_chunk is not None:
                    on_chunk(row)
            bar.update(len(idx), f"KLD {rows_out[-1]['kld'][0]:.5f}")
    finally:
        bar.close()
    return _kld_result(sums, np.concatenate(klds), np.concatenate(pdiffs), rows_out, ctx, n_chunk, add_bos,
                       str(base.path), time.perf_counter() - t0)


def _chunk_row(chunk: int, s: _KLDSums) -> dict:
    """The running figures llama-perplexity prints after each chunk."""
    log_ppl = s.nll.mean_and_uncertainty(s.count)
    log_ppl_base = s.nll_base.mean_and_uncertainty(s.count)
    ppl = math.exp(log_ppl[0])
    ratio_unc = math.sqrt(max(log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2 * s.nll_covariance(), 0.0))
    mse = s.p_diff2.mean_and_uncertainty(s.count)
    rms = math.sqrt(mse[0])
    top = s.n_same_top / s.count
    top_unc = math.sqrt(top * (1 - top) / (s.count - 1)) if s.count > 1 else 0.0
    return {"chunk": chunk, "ppl": (ppl, ppl * log_ppl[1]),
            "ln_ppl_ratio": (log_ppl[0] - log_ppl_base[0], ratio_unc), "kld": s.kld.mean_and_uncertainty(s.count),
            "rms_delta_p": (rms, 0.5 / rms * mse[1] if rms > 0 else 0.0), "same_top_p": (top, top_unc)}


_KLD_FRACTIONS = (("99.9", 0.999), ("99.0", 0.990), ("95.0", 0.950), ("90.0", 0.900))
_KLD_LOW = (("10.0", 0.100), ("5.0", 0.050), ("1.0", 0.010), ("0.1", 0.001))
_DP_FRACTIONS = _KLD_FRACTIONS + (("75.0", 0.750),)
_DP_LOW = (("25.0", 0.250),) + _KLD_LOW


def _kld_result(s: _KLDSums, kld_values, p_diff_values, chunk_rows, ctx, n_chunk, add_bos, base_path,
                seconds) -> KLDResult:
    final = _chunk_row(n_chunk, s)
    log_ppl = s.nll.mean_and_uncertainty(s.count)
    log_ppl_base = s.nll_base.mean_and_uncertainty(s.count)
    ppl, ppl_unc = final["ppl"]
    ppl_base = math.exp(log_ppl_base[0])
    ppl_base_unc = ppl_base * log_ppl_base[1]
    cov = s.nll_covariance()
    denom = log_ppl[1] * log_ppl_base[1]
    ratio, ratio_unc = final["ln_ppl_ratio"]
    diff_unc = math.sqrt(max(ppl_unc ** 2 + ppl_base_unc ** 2 - 2 * ppl * ppl_base * cov, 0.0))
    ks, ps = np.sort(kld_values), np.sort(p_diff_values)
    kp = {"max": float(ks[-1]), **{k: _percentile(ks, f) for k, f in _KLD_FRACTIONS}, "median": _median(ks),
          **{k: _percentile(ks, f) for k, f in _KLD_LOW}, "min": float(ks[0])}
    dp = {"max": float(ps[-1]), **{k: _percentile(ps, f) for k, f in _DP_FRACTIONS}, "median": _median(ps),
          **{k: _percentile(ps, f) for k, f in _DP_LOW}, "min": float(ps[0])}
    return KLDResult(
        ctx=ctx, n_chunks=n_chunk, n_scored=s.count, add_bos=add_bos, base_file=base_path,
        ppl=(ppl, ppl_unc), ppl_base=(ppl_base, ppl_base_unc),
        cor_ln_ppl=cov / denom if denom > 0 else float("nan"),
        ln_ppl_ratio=(ratio, ratio_unc), ppl_ratio=(math.exp(ratio), math.exp(ratio) * ratio_unc),
        ppl_diff=(ppl - ppl_base, diff_unc), kld=final["kld"], kld_percentiles=kp,
        delta_p=s.p_diff.mean_and_uncertainty(s.count), delta_p_percentiles=dp,
        rms_delta_p=final["rms_delta_p"], same_top_p=final["same_top_p"],
        chunks=chunk_rows, kld_values=kld_values, p_diff_values=p_diff_values, seconds=seconds)


# --------------------------------------------------------------------------- text output

KLD_TABLE_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                    "              Δp RMS            Same top p")


def format_kld_chunk(row: dict) -> str:
    p, r, k, d, t = (row[n] for n in ("ppl", "ln_ppl_ratio", "kld", "rms_delta_p", "same_top_p"))
    return (f"{row['chunk']:4d}    {p[0]:9.4f} ± {p[1]:9.4f}    {r[0]:10.5f} ± {r[1]:10.5f}"
            f"    {k[0]:10.5f} ± {k[1]:10.5f}    {100 * d[0]:6.3f} ± {100 * d[1]:6.3f} %"
            f"    {100 * t[0]:6.3f} ± {100 * t[1]:6.3f} %")


def format_perplexity(r: PerplexityResult) -> str:
    running = "".join(f"[{i + 1}]{v:.4f}," for i, v in enumerate(r.running))
    return f"{running}\nFinal estimate: PPL = {r.ppl:.4f} +/- {r.uncertainty:.5f}"


def format_kld(r: KLDResult) -> str:
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


# --------------------------------------------------------------------------- CLI

def add_perplexity_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perplexity (llama-perplexity's options)")
    g.add_argument("-f", "--file", metavar="FILE", help="the text to score (not needed with --kl-divergence)")
    g.add_argument("-c", "--ctx-size", dest="ctx", type=int, metavar="N",
                   help=f"tokens per chunk (default: {DEFAULT_CTX}; with --kl-divergence: the base file's)")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=int, default=DEFAULT_BATCH, metavar="N",
                   help=f"tokens per forward batch: batch-size // ctx chunks run together (default: {DEFAULT_BATCH})")
    g.add_argument("--chunks", type=int, metavar="N", help="score only the first N chunks (default: all)")
    g.add_argument("--kl-divergence-base", metavar="FILE",
                   help="write the model's log-probabilities to FILE (llama.cpp's format); with "
                        "--kl-divergence, read them from FILE instead")
    g.add_argument("--kl-divergence", action="store_true",
                   help="compare this model against --kl-divergence-base FILE: KLD, delta-p, same top p")
    g.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr (default: on)")


def run_perplexity_cli(args, load_runtime: Callable[..., object]) -> int:
    """`smollm3 perplexity`: load_runtime(**Runtime.load options) -> Runtime."""
    if args.kl_divergence:
        if not args.kl_divergence_base:
            raise RequestError("--kl-divergence needs --kl-divergence-base FILE (written by an earlier run)")
        base = read_base_file(args.kl_divergence_base)
        if args.ctx is not None and args.ctx != base.ctx:
            raise RequestError(f"-c {args.ctx}, but {base.path} was written with a context of {base.ctx}")
        ctx = base.ctx
    else:
        if not args.file:
            raise RequestError("no text: pass -f FILE")
        ctx = DEFAULT_CTX if args.ctx is None else args.ctx
        _check_int("-c/--ctx-size", ctx, 3)
        text = read_text_file(args.file)
    _check_int("-b/--batch-size", args.batch_size, 1)
    # A KV pool that holds one batch of chunks (llama.cpp sizes its context the same way).
    rt = load_runtime(max_seq_len=max(ctx, args.max_seq_len or 0),
                      kv_cache_tokens=_n_seq(args.batch_size, ctx) * ctx)
    out = sys.stdout
    if args.kl_divergence:
        if not args.json:
            print(KLD_TABLE_HEADER, file=out)

        def on_chunk(row):
            if not args.json:
                print(format_kld_chunk(row), file=out, flush=True)
        r = kl_divergence(rt, args.kl_divergence_base, chunks=args.chunks, batch_size=args.batch_size,
                          progress=args.progress, on_chunk=on_chunk)
        print(json.dumps(r.to_dict()) if args.json else "\n" + format_kld(r), file=out)
        return 0
    tokens, add_bos = tokenize(rt, text)
    n_chunk = n_chunks_of(len(tokens), ctx, args.chunks, what=str(args.file))
    n_seq = chunks_per_batch(rt, ctx, args.batch_size)
    print(f"perplexity: {len(tokens)} tokens, {n_chunk} chunks of {ctx} (BOS {'added' if add_bos else 'not added'}), "
          f"batch_size={args.batch_size}, n_seq={n_seq}", file=sys.stderr)
    bar = Progress(n_chunk, "perplexity", enabled=args.progress)
    r = perplexity_of_tokens(runtime_logits(rt), tokens, ctx, bos_id=rt.tokenizer.bos_id if add_bos else None,
                             chunks=args.chunks, batch_size=args.batch_size, base_file=args.kl_divergence_base,
                             progress=bar, add_bos=add_bos, n_seq=n_seq)
    if args.json:
        print(json.dumps(r.to_dict()), file=out)
    else:
        print(format_perplexity(r), file=out)
        if r.base_file:
            print(f"log-probabilities of {r.n_scored} tokens written to {r.base_file}", file=sys.stderr)
    return 0
