"""`smollm3 bench`: prefill and decode tokens/s of one model beside its roofline, with
lengths sized to the device, progress on stderr and the figures on stdout (tools/bench.py
measures)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .options import int_at_least, load_runtime, resolve_device

HELP = "prefill and decode tokens/s of a model, beside its roofline"
DESCRIPTION = ("Time prefill and decode end to end and print each figure beside its roofline (bytes per token / "
               "device bandwidth). The default lengths depend on the device: long ones on CUDA, short ones on "
               "the CPU (under a minute for the packaged SmolLM2-135M).")


@dataclass(frozen=True)
class Lengths:
    prefill: tuple[int, ...]        # prompt lengths to prefill
    contexts: tuple[int, ...]       # contexts to decode at
    decode_tokens: int              # decode steps per timed round


DEFAULT_LENGTHS = {"cuda": Lengths((512, 2048, 8192), (1024, 32768), 128), "cpu": Lengths((64, 256), (64, 256), 16)}


def add_arguments(p) -> None:
    cuda, cpu = DEFAULT_LENGTHS["cuda"], DEFAULT_LENGTHS["cpu"]

    def default(field: str) -> str:
        text = [",".join(map(str, v)) if isinstance(v, tuple) else str(v)
                for v in (getattr(cuda, field), getattr(cpu, field))]
        return f"default: {text[0]} on CUDA, {text[1]} on the CPU"

    g = p.add_argument_group("bench")
    g.add_argument("--prefill", type=_lengths, metavar="N,N", help=f"prompt lengths to time ({default('prefill')})")
    g.add_argument("--contexts", type=_lengths, metavar="L,L", help=f"contexts to decode at ({default('contexts')})")
    g.add_argument("--decode-tokens", type=int_at_least(1), metavar="N",
                   help=f"steps per decode round ({default('decode_tokens')})")
    g.add_argument("--rounds", type=int_at_least(1), default=3, help="timed rounds of each case (median reported)")
    g.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the eager torch reference (default: on)")
    g.add_argument("--eager-decode-tokens", type=int_at_least(1), default=8, metavar="N",
                   help="steps per decode round of the eager reference (default: 8; it is slow)")
    g.add_argument("--peak-gbps", type=float, help="device DRAM bandwidth for the roofline (default: table)")
    g.add_argument("--peak-tflops", type=float, help="device dense bf16 TFLOP/s (default: table)")
    g.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")


def _lengths(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers >= 1."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be integers >= 1, got {text!r}")
    return values


def run(args) -> int:
    import torch

    from ..tools.bench import decode_result, device_peaks, model_cost, prefill_result
    from ..tools.progress import Progress

    device = resolve_device(args)
    defaults = DEFAULT_LENGTHS[device.type]
    prefill = args.prefill or defaults.prefill
    contexts = args.contexts or defaults.contexts
    decode_tokens = args.decode_tokens or defaults.decode_tokens
    # Room for the longest decode round, the eager reference's included.
    steps = max(decode_tokens, args.eager_decode_tokens if args.eager else 0, 4)
    max_seq_len = max([*prefill, *(c + steps + 4 for c in contexts)])
    rt = load_runtime(args, max_seq_len=max_seq_len)
    backend, path = rt.backend, rt.source
    cost = model_cost(path, rt.config, rt.model.kv_dtype)
    peaks = device_peaks(device, args.peak_gbps, args.peak_tflops)
    print(f"model {path} on {peaks.name}: {cost.weight_bytes / 1e9:.3f} GB of weights read per token; "
          f"{_peaks_text(peaks)}", file=sys.stderr)

    use_graph = device.type == "cuda" and backend == "triton"
    eager = args.eager and backend != "torch"
    n_cases = (len(prefill) + len(contexts)) * (2 if eager else 1) + use_graph
    results = []
    with Progress(n_cases, "bench", unit="cases") as bar:
        def emit(result) -> None:
            results.append(result)
            print(format_result(result), flush=True)
            bar.update(1, f"{result.kind} {result.length} ({result.engine})")

        for n in prefill:
            emit(prefill_result(rt, cost, peaks, backend, n, args.rounds))
        for ctx in contexts:
            emit(decode_result(rt, cost, peaks, "graph" if use_graph else f"{backend}-eager", ctx, decode_tokens,
                               args.rounds))
        if use_graph:
            rt.engine.runner.forward = rt.model.forward
            emit(decode_result(rt, cost, peaks, "triton-eager", contexts[0], decode_tokens, args.rounds))
        del rt
        if eager:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ref = load_runtime(args, backend="torch", max_seq_len=max_seq_len)
            for n in prefill:
                emit(prefill_result(ref, cost, peaks, "torch-eager", n, 1))
            for ctx in contexts:
                emit(decode_result(ref, cost, peaks, "torch-eager", ctx, args.eager_decode_tokens, 1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(path), "device": asdict(peaks), "cost": asdict(cost),
                                         "results": [asdict(r) for r in results]}, indent=2))
    return 0


def _peaks_text(peaks) -> str:
    unknown = "unknown (not in the table; --peak-{} sets it)"
    gbps = f"{peaks.peak_gbps:g} GB/s" if peaks.peak_gbps else unknown.format("gbps")
    tflops = f"{peaks.peak_tflops:g} TFLOP/s" if peaks.peak_tflops else unknown.format("tflops")
    return f"peak bandwidth {gbps}, measured copy {peaks.copy_gbps:.1f} GB/s, peak bf16 {tflops}"


def format_result(r) -> str:
    what = f"{r.kind:<7} {r.engine:<12} {'ctx' if r.kind == 'decode' else 'len'} {r.length:>6}"
    text = f"{what}  {r.tok_per_s:10.1f} tok/s"
    if r.gb_per_s is not None:
        text += f"  {r.gb_per_s:7.1f} GB/s"
    if r.tflops is not None:
        text += f"  {r.tflops:7.3g} TFLOP/s"
    if r.roofline_tok_per_s:
        text += f"  roofline {r.roofline_tok_per_s:9.1f} tok/s ({100 * r.fraction_of_roofline:.1f}%)"
    if r.achievable_roofline_tok_per_s:
        text += f", {r.achievable_roofline_tok_per_s:.1f} at the measured copy bandwidth"
    return text
