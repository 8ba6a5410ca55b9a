"""End-to-end throughput of one model: prefill and decode tokens/s, each beside its roofline.

`smollm3 bench --model FILE` runs it for a user's own model (run_bench); the pytest
benches in bench/ call the same measuring functions on synthetic files.

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
  by the device's DRAM bandwidth, both the vendor peak and a measured device copy.
- prefill: matmul + attention FLOPs divided by the dense bf16 peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
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


def vendor_peaks() -> tuple[float | None, float | None]:
    """(DRAM GB/s, dense bf16 TFLOP/s) of the current CUDA device from the table;
    BENCH_PEAK_GBPS / BENCH_PEAK_TFLOPS override it."""
    name = torch.cuda.get_device_name()
    gbps, tflops = next((v for k, v in DEVICE_PEAKS.items() if k in name), (None, None))
    gbps = float(os.environ.get("BENCH_PEAK_GBPS") or gbps or 0) or None
    tflops = float(os.environ.get("BENCH_PEAK_TFLOPS") or tflops or 0) or None
    return gbps, tflops


def device_peaks(device: torch.device, peak_gbps: float | None = None, peak_tflops: float | None = None) -> DevicePeaks:
    if device.type != "cuda":
        return DevicePeaks(f"cpu ({os.cpu_count()} cores)", peak_gbps, None, peak_tflops)
    name = torch.cuda.get_device_name(device)
    table = next((v for k, v in DEVICE_PEAKS.items() if k in name), (None, None))
    return DevicePeaks(name, peak_gbps or table[0], copy_bandwidth(device), peak_tflops or table[1])


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * reps / seconds / 1e9


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

    def line(self) -> str:
        what = f"{self.kind:<7} {self.engine:<12} {'ctx' if self.kind == 'decode' else 'len'} {self.length:>6}"
        text = f"{what}  {self.tok_per_s:10.1f} tok/s"
        if self.gb_per_s is not None:
            text += f"  {self.gb_per_s:7.1f} GB/s"
        if self.tflops is not None:
            text += f"  {self.tflops:7.1f} TFLOP/s"
        if self.roofline_tok_per_s:
            text += f"  roofline {self.roofline_tok_per_s:9.1f} tok/s ({100 * self.fraction_of_roofline:.1f}%)"
        if self.achievable_roofline_tok_per_s:
            text += f", {self.achievable_roofline_tok_per_s:.1f} at the measured copy bandwidth"
        return text


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


def add_bench_arguments(parser: argparse.ArgumentParser, *, model_options: bool = True) -> None:
    """Options of `smollm3 bench`; model_options=False when the caller adds --model etc. itself."""
    if model_options:
        g = parser.add_argument_group("model")
        g.add_argument("--model", metavar="SOURCE", help="hub repo id, .gguf file or folder (default: the "
                                                         "packaged SmolLM2-135M-Instruct GGUF)")
        g.add_argument("--quant", help="which GGUF of a hub repo or folder, e.g. q4_k_m")
        g.add_argument("--dtype", help="compute dtype (default: bf16 on cuda, f32 on cpu)")
        g.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
        g.add_argument("--backend", choices=["cpu", "torch", "triton"], help="default: triton on cuda, cpu on cpu")
        g.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: every core)")
    g = parser.add_argument_group("bench")
    g.add_argument("--prefill", default="512,2048,8192", metavar="N,N",
                   help="prompt lengths to time (default: 512,2048,8192)")
    g.add_argument("--contexts", default="1024,32768", metavar="L,L",
                   help="contexts to decode at (default: 1024,32768)")
    g.add_argument("--decode-tokens", type=int, default=128, metavar="N", help="steps per decode round")
    g.add_argument("--rounds", type=int, default=3, help="timed rounds of each case (median reported)")
    g.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the eager torch reference (default: on)")
    g.add_argument("--eager-decode-tokens", type=int, default=8, metavar="N",
                   help="steps per decode round of the eager reference (default: 8; it is slow)")
    g.add_argument("--peak-gbps", type=float, help="device DRAM bandwidth for the roofline (default: table)")
    g.add_argument("--peak-tflops", type=float, help="device dense bf16 TFLOP/s (default: table)")
    g.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")


def _lengths(text: str, option: str) -> list[int]:
    from ..errors import RequestError
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RequestError(f"{option} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise RequestError(f"{option} values must be >= 1, got {text!r}")
    return values


def run_bench(args) -> int:
    """`smollm3 bench`: print (and optionally write as JSON) the figures of one model."""
    from .. import Runtime, hub
    from ..errors import RequestError

    prefill, contexts = _lengths(args.prefill, "--prefill"), _lengths(args.contexts, "--contexts")
    if args.decode_tokens < 1 or args.rounds < 1 or args.eager_decode_tokens < 1:
        raise RequestError("--decode-tokens, --eager-decode-tokens and --rounds must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = hub.packaged_smollm2() if args.model is None else hub.resolve(args.model, args.quant)
    # Room for the longest decode round, the eager reference's included (it runs on the CPU
    # now that the cpu backend, not the reference, is the default there).
    steps = max(args.decode_tokens, args.eager_decode_tokens if args.eager else 0, 4)
    max_seq_len = max([*prefill, *(c + steps + 4 for c in contexts)])
    rt = Runtime.load(path, device=device, dtype=args.dtype, backend=args.backend, max_seq_len=max_seq_len,
                      threads=args.threads)
    backend = rt.backend
    cost = model_cost(path, rt.config, rt.model.kv_dtype)
    peaks = device_peaks(device, args.peak_gbps, args.peak_tflops)
    print(f"model {path} on {peaks.name}: {cost.weight_bytes / 1e9:.3f} GB of weights read per token; "
          f"peak {peaks.peak_gbps or '?'} GB/s, measured copy "
          f"{f'{peaks.copy_gbps:.0f}' if peaks.copy_gbps else '?'} GB/s, {peaks.peak_tflops or '?'} TFLOP/s",
          file=sys.stderr)

    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        print(result.line(), flush=True)

    use_graph = device.type == "cuda" and backend == "triton"
    engine = "graph" if use_graph else f"{backend}-eager"
    for n in prefill:
        emit(prefill_result(rt, cost, peaks, backend, n, args.rounds))
    for ctx in contexts:
        emit(decode_result(rt, cost, peaks, engine, ctx, args.decode_tokens, args.rounds))
    if use_graph:
        rt.engine.runner = rt.model.forward
        emit(decode_result(rt, cost, peaks, "triton-eager", contexts[0], args.decode_tokens, args.rounds))
    del rt
    if args.eager and backend != "torch":
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref = Runtime.load(path, device=device, dtype=args.dtype, backend="torch", max_seq_len=max_seq_len)
        for n in prefill:
            emit(prefill_result(ref, cost, peaks, "torch-eager", n, 1))
        for ctx in contexts:
            emit(decode_result(ref, cost, peaks, "torch-eager", ctx, args.eager_decode_tokens, 1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(path), "device": asdict(peaks),
                                         "cost": asdict(cost), "results": [asdict(r) for r in results]}, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smollm3 bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
