"""`smollm3 chat`: the interactive REPL, one line of stdin per user message, the
conversation kept between turns."""
from __future__ import annotations

import sys
from typing import Iterator

from ..errors import SmolLMError
from .generate import check_thinking, stream_turn, user_content
from .options import error_message, load_runtime, sampling_kwargs

HELP = "interactive chat on stdin"
DESCRIPTION = ("Chat turn by turn: one line of stdin is one user message; the conversation is kept "
               "(answers without their reasoning). /exit or end of input quits.")


def add_arguments(p) -> None:
    p.add_argument("-p", "--prompt", help="first user message, before reading stdin")


def run(args) -> int:
    from ..chat import split_reasoning

    sampling = sampling_kwargs(args)
    rt = load_runtime(args)
    rt.encode_chat([{"role": "user", "content": ""}])   # no template: say so before the first question
    check_thinking(rt, args.thinking)
    history = [{"role": "system", "content": args.system}] if args.system is not None else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{rt.source.name}: one line per message; /exit or Ctrl-D quits.", file=sys.stderr)
    failed = False
    images = args.image
    for line in _user_lines(args.prompt, interactive):
        if line in ("/exit", "/quit"):
            break
        turn = history + [{"role": "user", "content": user_content(line, images)}]
        try:
            text = stream_turn(rt, *rt.encode_chat(turn, thinking=args.thinking), args.max_new_tokens, sampling)
        except SmolLMError as e:    # e.g. the conversation outgrew the context: say so, keep the REPL
            print(f"error: {error_message(e)}", file=sys.stderr)
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
