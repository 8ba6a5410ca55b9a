"""`smollm3 generate`, and the streamed turn that `smollm3 chat` shares: the text to stdout
as the engine decodes it, the timings to stderr."""
from __future__ import annotations

import sys
import time

from ..errors import RequestError
from .options import DEFAULTS, load_runtime, sampling_kwargs

HELP = "one answer (or raw continuation) streamed to stdout"
DESCRIPTION = ("Answer one prompt through the chat template (or continue it raw with --no-chat-template), "
               "streaming the text to stdout and a tokens/s line to stderr.")


def add_arguments(p) -> None:
    p.add_argument("-p", "--prompt", help="the prompt (default: read stdin when it is not a terminal)")
    p.add_argument("--no-chat-template", action="store_true", help="continue the raw prompt, no template")


def run(args) -> int:
    sampling = sampling_kwargs(args)
    prompt = args.prompt
    if args.no_chat_template and (args.system is not None or args.thinking is not None or args.image):
        raise RequestError("--system, --thinking and --image need the chat template; drop --no-chat-template")
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise RequestError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    rt = load_runtime(args)
    if args.no_chat_template:
        ids, mm_embeds = rt.tokenizer.encode(prompt), []
    else:
        check_thinking(rt, args.thinking)
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": user_content(prompt, args.image)})
        ids, mm_embeds = rt.encode_chat(messages, thinking=args.thinking)
    stream_turn(rt, ids, mm_embeds, args.max_new_tokens, sampling)
    return 0


def check_thinking(rt, thinking: bool | None) -> None:
    """--thinking on a model whose chat template has no thinking mode is refused now, by the
    template renderer's own check, not after the first question."""
    if thinking:
        rt.render_chat([{"role": "user", "content": ""}], thinking=True)


def user_content(text: str, images: list[str] | None):
    """A message's content: the text alone, or content parts with the images first."""
    if not images:
        return text
    return [*({"type": "image_url", "image_url": {"url": path}} for path in images), {"type": "text", "text": text}]


def stream_turn(rt, ids: list[int], mm_embeds: list, max_new_tokens: int | None, sampling: dict) -> str:
    """Stream the model's continuation of the prompt `ids` (mm_embeds: its image rows) to
    stdout, then its timings to stderr; returns the text. max_new_tokens None: the library's
    default, cut to what the context leaves after the prompt."""
    from ..sampling_params import SamplingParams

    if max_new_tokens is None:
        room = rt.model.max_seq_len - len(ids)
        # With no room left, ask for the default anyway: the engine then refuses with both numbers.
        max_new_tokens = min(DEFAULTS["max_new_tokens"], room) if room > 0 else DEFAULTS["max_new_tokens"]
    params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
    start = time.perf_counter()
    first = last = None
    n_tokens = 0
    pieces = []
    for out in rt.outputs(ids, params, mm_embeds):
        if out.token_ids:
            last = time.perf_counter()
            first = first or last
            n_tokens += len(out.token_ids)
        if out.text:
            pieces.append(out.text)
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(timing_line(len(ids), n_tokens, start, first, last), file=sys.stderr)
    return "".join(pieces)


def timing_line(n_prompt: int, n_tokens: int, start: float, first: float | None, last: float | None) -> str:
    """The first token comes out of the prompt pass, so it times the prompt; each later one
    is one decode step (as llama.cpp and candle count them)."""
    end = last if n_tokens else time.perf_counter()
    prompt_s = (first if n_tokens else end) - start
    line = f"{n_tokens} tokens in {end - start:.2f} s"
    if n_tokens > 1:
        line += f" ({(n_tokens - 1) / (last - first):.2f} tokens/s)"
    line += f", prompt {n_prompt} tokens in {prompt_s:.2f} s"
    if prompt_s > 0:
        line += f" ({n_prompt / prompt_s:.2f} tokens/s)"
    return line
