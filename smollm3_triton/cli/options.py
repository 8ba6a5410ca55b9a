"""The option groups several subcommands share, and what they turn into: a checked set of
sampling arguments (before any model loads) and a loaded Runtime.

Nothing heavy is imported here at module level (sampling_params is plain Python): `smollm3
--help` and every argument error answer before torch is imported.
"""
from __future__ import annotations

import argparse
import dataclasses

from ..errors import ContextLengthError, FieldError
from ..sampling_params import SamplingParams

# The library's defaults, the CLI's too: one default per knob.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
# The Python API's argument names as the CLI spells them, for errors that name an argument.
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
         "top_p": "--top-p", "min_p": "--min-p", "repetition_penalty": "--repeat-penalty", "seed": "--seed",
         "stop": "--stop", "max_seq_len": "--max-seq-len", "threads": "--threads", "dtype": "--dtype",
         "device": "--device", "thinking": "--thinking"}


def error_message(e: Exception) -> str:
    """An error as the CLI's user knows the arguments: flags, not the Python API's names."""
    if isinstance(e, ContextLengthError):
        return e.describe("--max-new-tokens", "pass a larger --max-seq-len")
    if isinstance(e, FieldError) and e.param in FLAGS:
        return e.renamed(FLAGS[e.param])
    return str(e)


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in low..high, refused as a usage error otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model-path", dest="model", metavar="SOURCE",
                   help="hub repo id, .gguf file, or folder (config.json + safetensors, or .gguf files); "
                        "default: the packaged SmolLM2-135M-Instruct GGUF")
    g.add_argument("--quant", "--quantization", dest="quant", metavar="NAME",
                   help="which GGUF of a hub repo or folder to use, e.g. q4_k_m, q8_0, f16")
    g.add_argument("--dtype", help="compute dtype: f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda)")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    g.add_argument("--backend", choices=["cpu", "torch", "triton"],
                   help="kernels to run: cpu (4-bit weights, fast), torch (the exact fp32 reference), triton "
                        "(default: triton on cuda, cpu on cpu)")
    g.add_argument("--threads", type=int_at_least(1), metavar="N", help="CPU threads (default: every core)")
    g.add_argument("--max-seq-len", type=int_at_least(1), metavar="N",
                   help="context length to allocate the KV cache for (default: the model's, at most 8192)")
    g.add_argument("--mmproj", metavar="FILE",
                   help="llama.cpp's vision projector GGUF (mmproj-*.gguf) for a SmolVLM text GGUF")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the library's SamplingParams)")
    g.add_argument("-n", "--max-new-tokens", "--sample-len", dest="max_new_tokens", type=int, metavar="N",
                   help=f"most tokens to generate (default: {DEFAULTS['max_new_tokens']}, or what the context "
                        f"leaves if less)")
    g.add_argument("--temperature", type=float, help=f"0 is greedy (default: {DEFAULTS['temperature']})")
    g.add_argument("--top-k", type=int, help=f"keep the k most likely tokens, 0: off (default: {DEFAULTS['top_k']})")
    g.add_argument("--top-p", type=float, help=f"nucleus sampling mass, 1: off (default: {DEFAULTS['top_p']})")
    g.add_argument("--min-p", type=float, help=f"drop tokens below min-p times the top probability, 0: off "
                                               f"(default: {DEFAULTS['min_p']})")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=float,
                   help=f"penalty on tokens already seen, 1: off (default: {DEFAULTS['repetition_penalty']})")
    g.add_argument("--seed", type=int, help="seed of the sampler (default: random)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")


def add_chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", metavar="TEXT", help="system message")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="reasoning on or off, for a model with a thinking mode such as SmolLM3 "
                        "(default: the chat template's default)")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="a PNG, JPEG or WebP image put before the (first) message; repeatable; needs a SmolVLM "
                        "model (a folder, or a text GGUF with --mmproj)")


def sampling_kwargs(args) -> dict:
    """The sampling options given (all but -n, which depends on the prompt), as SamplingParams
    arguments; checked now, with -n, so a bad value is refused before the model loads."""
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    kwargs = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.stop:
        kwargs["stop"] = tuple(args.stop)
    SamplingParams(**kwargs, **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}))
    return kwargs


def resolve_device(args):
    """--device as a torch.device, checked (default: cuda when available, else cpu)."""
    import torch

    from ..errors import RequestError

    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise RequestError(f"--device {args.device!r} is not a device (use cpu or cuda[:N])") from None
    if device.type not in ("cpu", "cuda"):
        raise RequestError(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"--device {args.device}: CUDA is not available on this machine")
    return device


def load_runtime(args, **overrides):
    """Runtime.load with the model options of `args`; overrides replace any of them."""
    from ..runtime import Runtime

    options = dict(quant=args.quant, mmproj=args.mmproj, device=resolve_device(args), dtype=args.dtype,
                   backend=args.backend, max_seq_len=args.max_seq_len, threads=args.threads)
    options.update(overrides)
    return Runtime.load(args.model, **options)
