"""Structured output: the grammar a request's output must match, enforced token by token.

    StructuredOutputs (a spec: JSON schema, regex, choice, GBNF grammar, structural tag)
 -> GrammarCompiler.compile      once per distinct spec (LRU cache), on a worker thread, refused
                                 past a time limit: never on the step thread, never hanging
 -> Constraint                   one matcher per sequence; gated until `after` ("</think>") appears
 -> fill_bitmasks                each step, one bitmask row per active constraint, in the
                                 sampler's state rows; the sampling kernel applies it to those rows only
 -> Constraint.advance           every sampled token moves the matcher; a stop token is allowed
                                 only where the grammar may end

The library is xgrammar (vLLM's default backend), chosen over llguidance on our tokenizers
(bench/structured_output.py; figures in bench/README.md): xgrammar fills a row's mask and
accepts its token in ~3 us on SmolLM2's 49,152 tokens (~27 us on a 128,256-token vocabulary),
llguidance in 170-460 us, paid on every step of every constrained row; xgrammar refuses a bad
schema, regex or GBNF grammar at compile time with a message, and reads llama.cpp's GBNF as it
is. Its bitmask layout (bit t of word t // 32: token t allowed) is what kernels/sampling.py reads. Its cost is compile time
(milliseconds to tens of ms per schema, seconds for a pathological one): hence the cache and
the time limit.

Preemption needs nothing here: the scheduler keeps a preempted sequence's output tokens and
recomputes them, so the matcher, which has accepted exactly those tokens, stays valid. An
aborted sequence takes its matcher with it; compiled grammars stay cached for the next request.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import re
import threading

import torch

from ..errors import RequestError
from ..kernels.sampling import SamplingState
from ..sampling_params import StructuredOutputs
from ..tokenizer import Tokenizer

DEFAULT_CACHE_SIZE = 64          # distinct compiled grammars kept
DEFAULT_COMPILE_TIMEOUT = 10.0   # seconds a request waits for its grammar before it is refused

# xgrammar's C++ errors begin "[hh:mm:ss] /path/file.cc:123: "; the reason is what follows.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return _CPP_PREFIX.sub("", text).strip().splitlines()[0][:300]


def _gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


# xgrammar writes a length-bounded JSON string's characters as [^"\\\r\n], which lets raw
# control characters through (invalid JSON: json.loads and pydantic refuse it); its unbounded
# strings exclude \0-\x1f as JSON requires. The grammar's text is patched to do the same.
_LOOSE_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'


def _strict_json_strings(ebnf: str) -> str:
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def choice_grammar(choices: tuple[str, ...]) -> str:
    return "root ::= " + " | ".join(_gbnf_literal(c) for c in choices)


class GrammarCompiler:
    """The tokenizer's vocabulary as xgrammar sees it, and the compiled grammars, cached.

    Special tokens (control tokens: <|im_start|>, ...) get no text, so no grammar can write
    them; the end tokens are allowed where a grammar may end."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, cache_size: int = DEFAULT_CACHE_SIZE,
                 timeout: float = DEFAULT_COMPILE_TIMEOUT, workers: int = 2):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.cache_size, self.timeout = cache_size, timeout
        self._cache: collections.OrderedDict[str, concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="smollm3-grammar")
        self._compiler = None
        self.compiles = 0            # grammars compiled (cache misses), for tests and stats

    def _xgr_compiler(self):
        # Imported on first use: xgrammar takes seconds to import, and most runs never need it.
        import xgrammar as xgr
        if self._compiler is None:
            tok = self.tokenizer
            vocab = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=[])
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def _build(self, spec: StructuredOutputs):
        import xgrammar as xgr
        compiler = self._xgr_compiler()
        kind, value = spec.kind, spec.value
        if kind == "json":
            # Compact separators (", " and ": ", no newlines): a small model cannot wander off
            # into whitespace, and the text is what json.dumps writes.
            grammar = xgr.Grammar.from_json_schema(json.dumps(value), any_whitespace=False)
            return compiler.compile_grammar(_strict_json_strings(str(grammar)))
        if kind == "regex":
            return compiler.compile_regex(value)
        if kind == "choice":
            return compiler.compile_grammar(choice_grammar(value))
        if kind == "grammar":
            return compiler.compile_grammar(value)
        grammar = xgr.Grammar.from_structural_tag(json.dumps(value))
        return compiler.compile_grammar(_strict_json_strings(str(grammar)))

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of `spec`; RequestError naming spec.param if it is invalid,
        unsupported, or takes longer than `timeout` seconds to compile (the compile goes on
        in the background and is cached, so asking again later may succeed)."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._pool.submit(self._build, spec)
                self._cache[key] = future
                self.compiles += 1
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise RequestError(f"{spec.param}: the grammar did not compile within {self.timeout:g} s; "
                               f"refused (a simpler schema compiles faster)", param=spec.param) from None
        except Exception as e:
            with self._lock:
                if self._cache.get(key) is future:
                    del self._cache[key]
            raise RequestError(f"{spec.param}: {_describe(spec.kind)} is invalid or unsupported: {_reason(e)}",
                               param=spec.param) from None

    def check_schema(self, schema: dict, param: str) -> None:
        """Refuse a JSON schema xgrammar cannot turn into a grammar (no tokenizer work: cheap),
        naming `param`; used to blame one tool among several."""
        import xgrammar as xgr
        try:
            xgr.Grammar.from_json_schema(json.dumps(schema))
        except Exception as e:
            raise RequestError(f"{param}: the JSON schema is invalid or unsupported: {_reason(e)}",
                               param=param) from None

    def constraint(self, spec: StructuredOutputs, stop_ids: set[int]) -> Constraint:
        return Constraint(self.compile(spec), stop_ids, spec.after)


def _describe(kind: str) -> str:
    return {"json": "the JSON schema", "regex": "the regex", "choice": "the choice list",
            "grammar": "the GBNF grammar", "structural_tag": "the structural tag"}[kind]


class Constraint:
    """One sequence's grammar state. Until `after` has appeared in the output the sequence
    is free (a reasoning model's thinking); from the next token on every token must fit."""

    def __init__(self, compiled, stop_ids: set[int], after: str | None):
        import xgrammar as xgr
        # No stop token at all (ignore_eos without stop_token_ids): xgrammar refuses an empty
        # override list, and the grammar's end then ends the sequence by itself.
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids) or None,
                                          terminate_without_stop_token=not stop_ids)
        self.after = after.encode() if after else None
        self._tail = b""

    @property
    def active(self) -> bool:
        return self.after is None

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, token: int, token_bytes) -> bool:
        """Take a sampled token; False if the grammar refuses it (never, for a masked row)."""
        if self.after is not None:
            seen = self._tail + token_bytes(token)
            if self.after in seen:
                self.after = None
            else:
                self._tail = seen[-(len(self.after) - 1):] if len(self.after) > 1 else b""
            return True
        return self.matcher.accept_token(token)


def fill_bitmasks(state: SamplingState, rows: list[tuple[int, object]]) -> None:
    """Each (state row, mask source) of a step: an active source's bitmask of the tokens it
    allows, and the row's flag that makes the sampler apply it (an inactive one: off). A
    source is anything with `active` and `fill_bitmask`: a grammar's Constraint, or a
    ThinkingBudget forcing its closing tag. No other row is read or written."""
    active = [(r, c) for r, c in rows if c.active]
    device = state.bitmask.device
    if active:
        if device.type == "cpu":
            for r, c in active:
                c.fill_bitmask(state.bitmask, r)
        else:
            import xgrammar as xgr
            staging = xgr.allocate_token_bitmask(len(active), state.vocab)
            for i, (_, c) in enumerate(active):
                c.fill_bitmask(staging, i)
            state.bitmask[torch.tensor([r for r, _ in active], device=device)] = staging.to(device, non_blocking=True)
    state.masked[torch.tensor([r for r, _ in rows], device=device)] = torch.tensor(
        [int(c.active) for _, c in rows], dtype=torch.int8).to(device, non_blocking=True)
