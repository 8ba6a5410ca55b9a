"""End-to-end throughput of one model: prefill and decode tokens/s, each beside its roofline.

`smollm3 bench --model FILE` (cli/bench.py: options, defaults, printing) runs it for a
user's own model; the pytest benches in bench/ call the same measuring functions on
synthetic files.

What is measured:
- prefill: one forward pass over N prompt tokens from position 0 (last-token logits
  only, as generation does), timed with CUDA events after a warm-up pass.
- decode: greedy steps at context L, timed on the device over many consecutive steps
  (step + sampler, the host queueing work and reading nothing back), with the graph
  decoder (CUDA graph replays) or the same step run eagerly. Only the positions
  matter for speed, so a long context is reached by setting the position: the KV
  rows before it hold zeros but are all read, as in a real context of that length.
- the eager reference: the torch backend (dequantize each matrix, then matmul; plain
  attention) in the same harness.

Rooflines:
- decode: bytes read per token (every weight the step reads, the file's actual tensor
  bytes: the LM head once, one embedding row, plus the K/V of L positions) divided
  by the device's DRAM bandwidth, both the vendor peak (GPUs in the table) and a
  measured copy of a buffer far larger than the caches (GPU and CPU).
- prefill: matmul + attention FLOPs divided by the dense bf16 peak.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Vendor peaks by device name: DRAM GB/s and dense bf16 TFLOP/s (spec sheets).
DEVICE_PEAKS = {"H200": (4800, 989), "H100 SXM": (3350, 989), "H100 PCIe": (2000, 756), "H100": (3350, 989),
                "A100-SXM4-80GB": (2039, 312), "A100 80GB PCIe": (1935, 312), "A100": (1555, 312),
                "L40S": (864, 362), "RTX 4090": (1008, 165)}


# ---------------------------------------------------------------- what a token costs

@dataclass(frozen=True)
class ModelCost:
    weight_bytes: int          # bytes of weights one decode step reads
    kv_bytes_per_position: int  # K and V of one position, all layers
    layer_flops_per_token: int  # 2 * matrix weights of the layers
    head_flops: int             # 2 * LM head weights (once per forward with last-token logits)
    attn_flops_coeff: int       # attention FLOPs per (query, key) pair: 4 * layers * heads * head_dim

    def decode_bytes(self, context: int) -> int:
        return self.weight_bytes + self.kv_bytes_per_position * context

    def prefill_flops(self, n: int) -> int:
        return self.layer_flops_per_token * n + self.head_flops + self.attn_flops_coeff * n * (n + 1) // 2


def model_cost(path: Path, config, kv_dtype: torch.dtype) -> ModelCost:
    """Costs from the file's own tensor sizes (GGUF tensor infos or safetensors headers)."""
    path = Path(path)
    sizes = tensor_bytes(path)
    embed, head = ("token_embd.weight", "output.weight") if path.suffix == ".gguf" else \
        ("model.embed_tokens.weight", "lm_head.weight")
    total = sum(sizes.values())
    if config.tie_word_embeddings:
        # the tied table is read whole as the LM head; an lm_head copy a folder may hold is unused
        weight_bytes = total - sizes.get(head, 0)
    else:
        weight_bytes = total - sizes[embed] + sizes[embed] // config.vocab_size   # one embedding row
    c = config
    layer_params = c.hidden_size * (c.qkv_rows + c.n_heads * c.head_dim + 3 * c.intermediate_size)
    return ModelCost(
        weight_bytes=weight_bytes,
        kv_bytes_per_position=2 * c.n_layers * c.n_kv_heads * c.head_dim * kv_dtype.itemsize,
        layer_flops_per_token=2 * c.n_layers * layer_params,
        head_flops=2 * c.vocab_size * c.hidden_size,
        attn_flops_coeff=4 * c.n_layers * c.n_heads * c.head_dim)


def tensor_bytes(path: Path) -> dict[str, int]:
    path = Path(path)
    if path.suffix == ".gguf":
        from ..gguf.reader import GGUFFile
        with GGUFFile(path) as f:
            return {name: info.nbytes for name, info in f.tensors.items()}
    from safetensors import safe_open
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                info = handle.get_slice(name)
                itemsize = {"F32": 4, "F16": 2, "BF16": 2}.get(info.get_dtype(), 4)
                out[name] = math.prod(info.get_shape()) * itemsize
    return out


@dataclass(frozen=True)
class DevicePeaks:
    name: str
    peak_gbps: float | None       # vendor DRAM bandwidth
    copy_gbps: float | None       # measured device-to-device copy (read + write)
    peak_tflops: float | None     # vendor dense bf16


def _table_peaks(name: str) -> tuple[float | None, float | None]:
    return next((v for k, v in DEVICE_PEAKS.items() if k in name), (None, None))


def vendor_peaks() -> tuple[float | None, float | None]:
    """(DRAM GB/s, dense bf16 TFLOP/s) of the current CUDA device from the table;
    BENCH_PEAK_GBPS / BENCH_PEAK_TFLOPS override it."""
    gbps, tflops = _table_peaks(torch.cuda.get_device_name())
    gbps = float(os.environ.get("BENCH_PEAK_GBPS") or gbps or 0) or None
    tflops = float(os.environ.get("BENCH_PEAK_TFLOPS") or tflops or 0) or None
    return gbps, tflops


def device_peaks(device: torch.device, peak_gbps: float | None = None, peak_tflops: float | None = None) -> DevicePeaks:
    """The given peaks, else the table's (GPUs only: a CPU's bandwidth depends on its memory
    channels, not its name), and a measured copy bandwidth."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = _table_peaks(name)
    else:
        name, table = f"cpu ({os.cpu_count()} cores)", (None, None)
    return DevicePeaks(name, peak_gbps or table[0], copy_bandwidth(device), peak_tflops or table[1])


def copy_bandwidth(device: torch.device, reps: int = 5) -> float:
    """GB/s of a copy of a buffer far larger than the caches (1 GiB on a GPU, 256 MiB on the
    CPU), counting the bytes read and written; the median of `reps` copies after a warm-up."""
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 28
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(reps):
        with Timer(device) as t:
            dst.copy_(src)
        seconds.append(t.seconds)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(seconds) / 1e9


# ---------------------------------------------------------------- timing

class Timer:
    """Wall time of device work: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def prefill_seconds(rt, n: int, rounds: int) -> list[float]:
    """Seconds of each of `rounds` prefill passes over n tokens (after one warm-up pass):
    one forward over the whole prompt in the engine's KV pool, the last token's logits."""
    from ..model import Batch
    model = rt.model
    ids = random_ids(n, model.config.vocab_size)
    out = []
    with rt.engine.exclusive(-(-n // rt.engine.block_size)) as blocks, torch.inference_mode():
        batch = Batch.from_sequences([ids], blocks, rt.engine.block_size, model.device)
        batch.logits_rows = batch.logits_rows[-1:]
        for r in range(rounds + 1):
            with Timer(model.device) as t:
                model.forward(batch)
            if r:
                out.append(t.seconds)
    return out


def decode_seconds(rt, context: int, n_tokens: int, rounds: int, params=None) -> list[float]:
    """Seconds per token of `rounds` runs of n_tokens engine steps of one sequence after a
    `context`-token prompt (its prefill is not timed; the first round is a warm-up)."""
    from ..sampling_params import SamplingParams
    params = params or SamplingParams(temperature=0.0)
    engine = rt.engine
    if context + n_tokens + 4 > engine.max_seq_len:
        raise ValueError(f"context {context} + {n_tokens} tokens does not fit max_seq_len {engine.max_seq_len}")
    out = []
    for r in range(rounds + 1):
        count = 4 if r == 0 else n_tokens
        run = dataclasses.replace(params, max_new_tokens=count + 1, ignore_eos=True)
        engine.add_request(random_ids(context, rt.config.vocab_size, seed=r).tolist(), run)
        while not engine.step():          # the prefill, chunked: until the first token comes out
            pass
        with Timer(rt.model.device) as t:
            for _ in range(count):
                engine.step()
        if r:
            out.append(t.seconds / count)
    return out


# ---------------------------------------------------------------- the run

@dataclass
class Result:
    kind: str                  # "prefill" | "decode"
    engine: str                # "graph" | "triton-eager" | "torch-eager"
    length: int                # prompt tokens (prefill) or context (decode)
    tok_per_s: float
    runs: list[float]          # tok/s of each round
    roofline_tok_per_s: float | None     # at the vendor peak
    fraction_of_roofline: float | None
    gb_per_s: float | None = None        # decode: bytes read per token x tok/s
    achievable_roofline_tok_per_s: float | None = None    # at the measured copy bandwidth
    tflops: float | None = None          # prefill


def prefill_result(rt, cost: ModelCost, peaks: DevicePeaks, engine: str, n: int, rounds: int) -> Result:
    secs = prefill_seconds(rt, n, rounds)
    rate = n / statistics.median(secs)
    flops = cost.prefill_flops(n)
    roof = peaks.peak_tflops * 1e12 / flops * n if peaks.peak_tflops else None
    return Result("prefill", engine, n, rate, [n / s for s in secs], roof, rate / roof if roof else None,
                  tflops=flops / statistics.median(secs) / 1e12)


def decode_result(rt, cost: ModelCost, peaks: DevicePeaks, engine: str, context: int, n_tokens: int,
                  rounds: int, params=None) -> Result:
    secs = decode_seconds(rt, context, n_tokens, rounds, params)
    rate = 1 / statistics.median(secs)
    nbytes = cost.decode_bytes(context)
    roof = peaks.peak_gbps * 1e9 / nbytes if peaks.peak_gbps else None
    achievable = peaks.copy_gbps * 1e9 / nbytes if peaks.copy_gbps else None
    return Result("decode", engine, context, rate, [1 / s for s in secs], roof, rate / roof if roof else None,
                  gb_per_s=nbytes * rate / 1e9, achievable_roofline_tok_per_s=achievable)
