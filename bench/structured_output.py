"""Structured output's costs on the CPU: `python -m bench.structured_output [--rounds N] [--threads T]`.

1. Library comparison, xgrammar against llguidance, on SmolLM2's vocabulary (49,152 tokens,
   the packaged GGUF's) and on a synthetic 128,256-token byte-level vocabulary (SmolLM2's
   tokens plus concatenations of two of them, to SmolLM3's size: no SmolLM3 tokenizer is
   on this machine): vocabulary setup, compile time of each schema the tests use, and the
   per-token cost of filling a mask and accepting the token along a valid answer.
2. Decode cost, constrained against free, on the engine with the real SmolLM2-135M (the
   default `cpu` backend) at batch 1 and 16: the mean decode-step time over the same steps,
   the two runs interleaved round by round, free first; and, less sensitive to a loaded
   machine, the time the constraint itself takes per step (masks filled (the sampler applies them),
   matchers advanced), timed inside the engine during the constrained runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch


def schemas() -> dict[str, tuple[str, object]]:
    """(kind, spec) of every schema, regex and grammar the structured-output tests send."""
    from tests.test_structured_output import DATE, GBNF, PERSON
    from tests.test_structured_server import ANSWER, SCHEMAS, WEATHER, Person
    out = {"tests PERSON": ("json", PERSON), "pydantic Person ($defs, enum, optional)":
           ("json", Person.model_json_schema()), "tool WEATHER": ("json", WEATHER), "ANSWER": ("json", ANSWER),
           "regex DATE": ("regex", DATE), "GBNF": ("grammar", GBNF)}
    out.update({f"concurrent schema {i}": ("json", s) for i, s in enumerate(SCHEMAS)})
    return out


def person_text() -> str:
    return json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["red", "blue"], "ok": True, "nick": None})


def synthetic_vocab(base: list[bytes], size: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    words = [t for t in base if t and len(t) < 8]
    seen, out = set(base), list(base)
    while len(out) < size:
        t = rng.choice(words) + rng.choice(words)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def xgrammar_case(vocab, stop, specs, answer_ids):
    import xgrammar as xgr

    from smollm3_triton.engine.structured_output import _strict_json_strings
    t = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[stop]),
                                   max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - t
    compile_ms = {}
    for name, (kind, spec) in specs.items():
        t = time.perf_counter()
        if kind == "json":
            grammar = xgr.Grammar.from_json_schema(json.dumps(spec), any_whitespace=False)
            compiler.compile_grammar(_strict_json_strings(str(grammar)))
        elif kind == "regex":
            compiler.compile_regex(spec)
        else:
            compiler.compile_grammar(spec)
        compile_ms[name] = (time.perf_counter() - t) * 1e3
    grammar = xgr.Grammar.from_json_schema(json.dumps(specs["tests PERSON"][1]), any_whitespace=False)
    compiled = compiler.compile_grammar(_strict_json_strings(str(grammar)))
    bitmask = xgr.allocate_token_bitmask(1, len(vocab))
    times = []
    for _ in range(5):
        m = xgr.GrammarMatcher(compiled, override_stop_tokens=[stop])
        t = time.perf_counter()
        for tok in answer_ids:
            m.fill_next_token_bitmask(bitmask, 0)
            assert m.accept_token(tok)
        times.append((time.perf_counter() - t) / len(answer_ids) * 1e6)
    return setup, compile_ms, statistics.median(times)


def llguidance_case(vocab, stop, specs, answer_ids, encode):
    import llguidance
    import llguidance.torch as llgt

    class Vocabulary:
        eos_token_id, bos_token_id, tokens, special_token_ids = stop, None, vocab, []

        def __call__(self, s):
            return encode(s.decode() if isinstance(s, bytes) else s)

    t = time.perf_counter()
    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()))
    setup = time.perf_counter() - t
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def grammar_of(kind, spec):
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=options)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        return llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark.gbnf_to_lark(spec))

    compile_ms = {}
    for name, (kind, spec) in specs.items():
        t = time.perf_counter()
        m = llguidance.LLMatcher(tok, grammar_of(kind, spec))
        compile_ms[name] = (time.perf_counter() - t) * 1e3 if not m.is_error() else float("nan")
    bitmask = llgt.allocate_token_bitmask(1, len(vocab))
    times = []
    for _ in range(5):
        m = llguidance.LLMatcher(tok, grammar_of(*specs["tests PERSON"]))
        t = time.perf_counter()
        for token in answer_ids:
            llgt.fill_next_token_bitmask(m, bitmask, 0)
            assert m.consume_token(token), m.get_error()
        times.append((time.perf_counter() - t) / len(answer_ids) * 1e6)
    return setup, compile_ms, statistics.median(times)


def compare_libraries() -> None:
    from smollm3_triton.gguf.reader import GGUFFile
    from smollm3_triton.hub import packaged_smollm2
    from smollm3_triton.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(GGUFFile(packaged_smollm2()).metadata)
    base = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
    stop = tok.token_to_id("<|im_end|>")
    specs = schemas()
    answer = tok.encode(person_text()) + [stop]
    for label, vocab in (("SmolLM2 49,152", base), ("synthetic 128,256", synthetic_vocab(base, 128256))):
        x = xgrammar_case(vocab, stop, specs, answer)
        g = llguidance_case(vocab, stop, specs, answer, tok.encode)
        print(f"\n### {label} tokens\n\n| | xgrammar | llguidance |\n| --- | --- | --- |")
        print(f"| vocabulary setup | {x[0] * 1e3:.0f} ms | {g[0] * 1e3:.0f} ms |")
        print(f"| mask + accept per token (PERSON answer, {len(answer)} tokens) | {x[2]:.1f} us | {g[2]:.1f} us |")
        for name in specs:
            print(f"| compile: {name} | {x[1][name]:.1f} ms | {g[1][name]:.1f} ms |")


def decode_cost(rounds: int, steps: int) -> None:
    from smollm3_triton import Runtime
    from smollm3_triton.engine import engine as engine_module
    from smollm3_triton.engine import structured_output
    from smollm3_triton.sampling_params import SamplingParams, StructuredOutputs

    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    engine_module.fill_bitmasks = timed(structured_output.fill_bitmasks)    # applied inside the sampler
    structured_output.Constraint.advance = timed(structured_output.Constraint.advance)
    rt = Runtime.load(None, device="cpu", max_seq_len=1024, max_num_seqs=16)
    # A long answer under a JSON grammar (strings: the masks with the most tokens allowed).
    spec = StructuredOutputs(json={"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 40})
    rt.engine.grammars.compile(spec)
    prompts = [rt.encode_chat([{"role": "user", "content": f"List {40 + i} English words as JSON."}])[0]
               for i in range(16)]

    def step_time(batch: int, constrained: bool) -> float:
        engine = rt.engine
        params = SamplingParams(max_new_tokens=steps + 8, temperature=0, ignore_eos=not constrained,
                                structured_outputs=spec if constrained else None)
        ids = [engine.add_request(p, params) for p in prompts[:batch]]
        started: set[str] = set()
        while len(started) < batch:                    # the prefills (and first tokens)
            started |= {o.request_id for o in engine.step()}
        spent[0] = 0.0
        t = time.perf_counter()
        for _ in range(steps):
            outs = engine.step()
            assert len(outs) == batch and not any(o.finished for o in outs)
        elapsed = time.perf_counter() - t
        for i in ids:
            engine.abort(i)
        engine.step()
        return elapsed / steps, spent[0] / steps

    for batch in (1, 16):
        free, constrained, own = [], [], []
        for _ in range(rounds):
            free.append(step_time(batch, False)[0])
            step, work = step_time(batch, True)
            constrained.append(step)
            own.append(work)
        f, c, w = statistics.median(free), statistics.median(constrained), statistics.median(own)
        print(f"| {batch} | {f * 1e3:.1f} ms | {c * 1e3:.1f} ms | {(c / f - 1) * 100:+.1f}% | {w * 1e3:.2f} ms "
              f"({w / f * 100:.1f}%) | {', '.join(f'{x * 1e3:.0f}' for x in free)} / "
              f"{', '.join(f'{x * 1e3:.0f}' for x in constrained)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-libraries", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load: {os.getloadavg()}, torch threads {args.threads}")
    if not args.skip_libraries:
        compare_libraries()
    print(f"\n### decode step, free vs constrained (SmolLM2-135M, cpu backend, {args.steps} steps, "
          f"median of {args.rounds} interleaved rounds)\n")
    print("| batch | free step | constrained step | difference | constraint work per step (of the free step) | "
          "rounds (ms, free / constrained) |\n| --- | --- | --- | --- | --- | --- |")
    decode_cost(args.rounds, args.steps)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
