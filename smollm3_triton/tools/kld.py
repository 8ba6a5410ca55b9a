"""KL divergence statistics of a model against a base file's log-probabilities, as
llama-perplexity --kl-divergence computes and reports them (tools/perplexity/perplexity.cpp).

Per scored token: KLD(base || Q) over the vocabulary (base terms below e^-16 dropped, as
llama.cpp drops them), delta-p = p_Q(token) - p_base(token), and whether the top-1 tokens
agree. In total: PPL(Q), PPL(base), ln(PPL(Q)/PPL(base)) with the covariance of the two,
mean KLD with its uncertainty, RMS delta-p, "Same top p", and percentiles of KLD and
delta-p. Sums run in double as llama.cpp's do; statistics over fewer than 100 tokens are
flagged as too few, as llama.cpp prints none below that.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

MIN_STATS_TOKENS = 100          # llama.cpp prints no KLD statistics below this

_KLD_FRACTIONS = (("99.9", 0.999), ("99.0", 0.990), ("95.0", 0.950), ("90.0", 0.900))
_KLD_LOW = (("10.0", 0.100), ("5.0", 0.050), ("1.0", 0.010), ("0.1", 0.001))
_DP_FRACTIONS = _KLD_FRACTIONS + (("75.0", 0.750),)
_DP_LOW = (("25.0", 0.250),) + _KLD_LOW


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
class KLDSums:
    """Everything accumulated over the scored tokens so far; add() takes a chunk's rows."""
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

    def add(self, rows: torch.Tensor, targets: torch.Tensor, p_log_base: torch.Tensor):
        """Logits rows [n, V] of the model against the base's log-probabilities [n, V];
        -> (kld [n], p_diff [n]) float32 numpy, for the percentiles."""
        rows = rows.float()
        mx = rows.max(dim=-1).values
        lse = torch.log(torch.exp(rows - mx[:, None]).double().sum(dim=-1)).float()
        m = mx + lse
        nll = m - rows.gather(1, targets[:, None]).squeeze(1)
        nll_base = -p_log_base.gather(1, targets[:, None]).squeeze(1)
        terms = torch.where(p_log_base > -16.0, torch.exp(p_log_base) * (p_log_base - rows + m[:, None]), 0.0)
        kld = terms.double().sum(dim=-1)
        p_diff = torch.exp(-nll) - torch.exp(-nll_base)
        p_diff2 = (p_diff * p_diff).double()
        self.nll.add(nll, nll * nll)
        self.nll_base.add(nll_base, nll_base * nll_base)
        self.nll_nll_base += float((nll * nll_base).double().sum())
        self.kld.add(kld, kld * kld)
        self.p_diff.add(p_diff, p_diff2)
        self.p_diff2.add(p_diff2, p_diff2 * p_diff2)
        self.n_same_top += int((rows.argmax(dim=-1) == p_log_base.argmax(dim=-1)).sum())
        self.count += rows.shape[0]
        return kld.float().cpu().numpy(), p_diff.cpu().numpy()

    def running(self, chunk: int) -> dict:
        """The running figures llama-perplexity prints after each chunk."""
        log_ppl = self.nll.mean_and_uncertainty(self.count)
        log_ppl_base = self.nll_base.mean_and_uncertainty(self.count)
        ppl = math.exp(log_ppl[0])
        ratio_unc = math.sqrt(max(log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2 * self.nll_covariance(), 0.0))
        mse = self.p_diff2.mean_and_uncertainty(self.count)
        rms = math.sqrt(mse[0])
        top = self.n_same_top / self.count
        top_unc = math.sqrt(top * (1 - top) / (self.count - 1)) if self.count > 1 else 0.0
        return {"chunk": chunk, "ppl": (ppl, ppl * log_ppl[1]),
                "ln_ppl_ratio": (log_ppl[0] - log_ppl_base[0], ratio_unc),
                "kld": self.kld.mean_and_uncertainty(self.count),
                "rms_delta_p": (rms, 0.5 / rms * mse[1] if rms > 0 else 0.0), "same_top_p": (top, top_unc)}


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


def _percentiles(values: np.ndarray, high, low) -> dict[str, float]:
    s = np.sort(values)
    return {"max": float(s[-1]), **{k: _percentile(s, f) for k, f in high}, "median": _median(s),
            **{k: _percentile(s, f) for k, f in low}, "min": float(s[0])}


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

    @classmethod
    def from_sums(cls, s: KLDSums, kld_values: np.ndarray, p_diff_values: np.ndarray, chunk_rows: list[dict], *,
                  ctx: int, add_bos: bool, base_file: str, seconds: float) -> KLDResult:
        n_chunk = len(chunk_rows)
        final = s.running(n_chunk)
        log_ppl = s.nll.mean_and_uncertainty(s.count)
        log_ppl_base = s.nll_base.mean_and_uncertainty(s.count)
        ppl, ppl_unc = final["ppl"]
        ppl_base = math.exp(log_ppl_base[0])
        ppl_base_unc = ppl_base * log_ppl_base[1]
        cov = s.nll_covariance()
        denom = log_ppl[1] * log_ppl_base[1]
        ratio, ratio_unc = final["ln_ppl_ratio"]
        diff_unc = math.sqrt(max(ppl_unc ** 2 + ppl_base_unc ** 2 - 2 * ppl * ppl_base * cov, 0.0))
        return cls(
            ctx=ctx, n_chunks=n_chunk, n_scored=s.count, add_bos=add_bos, base_file=base_file,
            ppl=(ppl, ppl_unc), ppl_base=(ppl_base, ppl_base_unc),
            cor_ln_ppl=cov / denom if denom > 0 else float("nan"),
            ln_ppl_ratio=(ratio, ratio_unc), ppl_ratio=(math.exp(ratio), math.exp(ratio) * ratio_unc),
            ppl_diff=(ppl - ppl_base, diff_unc), kld=final["kld"],
            kld_percentiles=_percentiles(kld_values, _KLD_FRACTIONS, _KLD_LOW),
            delta_p=s.p_diff.mean_and_uncertainty(s.count),
            delta_p_percentiles=_percentiles(p_diff_values, _DP_FRACTIONS, _DP_LOW),
            rms_delta_p=final["rms_delta_p"], same_top_p=final["same_top_p"],
            chunks=chunk_rows, kld_values=kld_values, p_diff_values=p_diff_values, seconds=seconds)
