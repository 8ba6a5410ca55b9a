"""Structured output in the engine and the Python API: every constrained output matches its
grammar, unconstrained rows are bitwise untouched, the matcher survives preemption and
leaves nothing behind on abort, end tokens come only where the grammar may end, a reasoning
model's thinking stays free, bad or too-expensive specs are refused naming the argument.

Oracles: jsonschema (the output validates), Python's re (regexes and the GBNF grammar's
language written as a regex), llguidance (an independent grammar engine: a cut-off output is
a valid prefix), and the same request run alone (batch invariance on the fp32 torch path).
"""
from __future__ import annotations

import contextlib
import json
import re
import time

import pytest
import torch

from smollm3_triton import Runtime
from smollm3_triton.chat_parser import ChatTextParser, tool_calls
from smollm3_triton.errors import FieldError, RequestError
from smollm3_triton.sampling_params import SamplingParams, StructuredOutputs
from tests.helpers.engine_runs import fresh_engine, random_prompts, run_alone, summary
from tests.helpers.serve_util import SMOLLM3_TEMPLATE, ScriptedRunner, tiny_folder

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

# A finite language: every string and list is bounded, so any sampled path ends.
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "ok": {"type": "boolean"},
    "nick": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]}},
    "required": ["name", "age", "tags", "ok", "nick"], "additionalProperties": False}
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
GBNF = 'root ::= "The answer is " digit digit? " " unit "."\ndigit ::= [0-9]\nunit ::= "cm" | "kg"'
GBNF_AS_REGEX = r"The answer is \d\d? (cm|kg)\."
CHOICES = ("alpha", "beta gamma", "delta")


def valid(spec: StructuredOutputs, text: str) -> bool:
    if spec.json is not None:
        try:
            jsonschema.validate(json.loads(text), spec.json)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.choice is not None:
        return text in spec.choice
    return re.fullmatch(GBNF_AS_REGEX, text) is not None


SPECS = [StructuredOutputs(json=PERSON), StructuredOutputs(regex=DATE), StructuredOutputs(choice=CHOICES),
         StructuredOutputs(grammar=GBNF)]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    folder = tiny_folder(tmp_path_factory.mktemp("so"), "smollm3", template=SMOLLM3_TEMPLATE)
    return Runtime.load(folder, device="cpu", backend="torch", max_seq_len=512)


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


def test_every_constrained_output_matches_its_grammar(rt):
    """A random model sampled at temperature 1: whatever it draws, the text matches."""
    engine = fresh_engine(rt)
    prompts = random_prompts(8, [5, 17, 40], seed=1)
    requests = [(p, SamplingParams(max_new_tokens=160, temperature=1.0, seed=i, structured_outputs=SPECS[i % 4]))
                for i, p in enumerate(prompts)]
    for (_, params), outs in zip(requests, engine.run(requests)):
        text = text_of(outs)
        assert outs[-1].finish_reason == "stop", text
        assert valid(params.structured_outputs, text), text


def test_unconstrained_rows_bitwise_untouched(rt):
    """8 free and 8 constrained requests together: each free one's tokens and logprobs equal
    the same request alone; each constrained one too (its mask depends on itself only)."""
    prompts = random_prompts(16, [7, 30, 12, 55], seed=2)

    def params_of(i):
        so = StructuredOutputs(json={**PERSON, "required": PERSON["required"][: 1 + i % 5]}) if i % 2 else None
        return SamplingParams(max_new_tokens=12, temperature=0.8, seed=i, logprobs=2, structured_outputs=so)

    batched = [summary(o) for o in fresh_engine(rt, max_num_seqs=16).run(
        [(p, params_of(i)) for i, p in enumerate(prompts)])]
    solo_engine = fresh_engine(rt, enable_prefix_caching=False)
    solo = [run_alone(solo_engine, p, params_of(i)) for i, p in enumerate(prompts)]
    assert batched == solo


def test_preemption_keeps_the_matcher(rt):
    """A pool for 2 sequences, 6 constrained requests: preempted ones are recomputed and end
    with the same valid outputs as alone."""
    prompts = random_prompts(6, [40, 23, 47], seed=3)
    params = [SamplingParams(max_new_tokens=80, temperature=1.0, seed=i, structured_outputs=SPECS[0])
              for i in range(6)]
    solo_engine = fresh_engine(rt, enable_prefix_caching=False)
    solo = [run_alone(solo_engine, p, s) for p, s in zip(prompts, params)]
    engine = fresh_engine(rt, kv_cache_tokens=2 * 96, max_num_seqs=6, max_num_batched_tokens=64)
    results = engine.run(list(zip(prompts, params)))
    assert engine.stats().preemptions > 0
    assert [summary(o) for o in results] == solo
    for s, outs in zip(params, results):
        assert valid(s.structured_outputs, text_of(outs))
    assert engine.stats().free_blocks == engine.pool.n_blocks


def scripted(rt, engine, text_or_ids):
    ids = rt.tokenizer.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    engine.runner.forward = ScriptedRunner(rt.model, ids)


def test_end_token_only_where_the_grammar_may_end(rt):
    """A model that wants to stop at once: free, it says nothing; constrained to a choice, it
    must finish one (its end token is masked until then)."""
    end = rt.tokenizer.token_to_id("<|im_end|>")
    prompt = rt.tokenizer.encode("Pick one:")
    engine = fresh_engine(rt)
    scripted(rt, engine, [end])
    free = engine.run([(prompt, SamplingParams(max_new_tokens=20, temperature=0))])[0]
    assert free[-1].token_ids == [end] and text_of(free) == ""
    scripted(rt, engine, [end])
    outs = engine.run([(prompt, SamplingParams(max_new_tokens=20, temperature=0,
                                               structured_outputs=StructuredOutputs(choice=CHOICES)))])[0]
    assert text_of(outs) in CHOICES and outs[-1].token_ids[-1] == end and outs[-1].finish_reason == "stop"


def test_reasoning_is_free_then_the_constraint_starts(rt):
    """rt.chat with thinking on (SmolLM3's template): the scripted reasoning, which no JSON
    grammar allows, comes out as written; the answer after </think> is forced into the schema
    although the script writes prose."""
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    reasoning = "Let me think {{ about it"
    real = rt.engine.runner.forward
    try:
        scripted(rt, rt.engine, f"<think>\n{reasoning}\n</think>\nCertainly not JSON, sorry.")
        reply = rt.chat([{"role": "user", "content": "Yes or no?"}], thinking=True, max_new_tokens=60,
                        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                                              "schema": schema}})
    finally:
        rt.engine.runner.forward = real
    assert reply.reasoning == reasoning
    jsonschema.validate(json.loads(reply.content), schema)


def test_length_cut_leaves_a_valid_prefix(rt):
    """Cut off by max_new_tokens inside the object: finish_reason "length", and the text is
    a prefix that an independent grammar engine (llguidance) accepts as incomplete."""
    llguidance = pytest.importorskip("llguidance")
    engine = fresh_engine(rt)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=5,
                            structured_outputs=StructuredOutputs(json=PERSON))
    outs = engine.run([(rt.tokenizer.encode("JSON:"), params)])[0]
    assert outs[-1].finish_reason == "length"
    ids = [t for o in outs for t in o.token_ids]
    matcher = llguidance_matcher(llguidance, rt.tokenizer, PERSON)
    assert matcher.consume_tokens(ids), matcher.get_error()
    assert not matcher.is_accepting()


def llguidance_matcher(llguidance, tokenizer, schema):
    class Vocabulary:
        eos_token_id = tokenizer.token_to_id("<|im_end|>")
        bos_token_id = None
        tokens = [b"" if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

        def __call__(self, s):
            return tokenizer.encode(s.decode() if isinstance(s, bytes) else s)

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    return llguidance.LLMatcher(tok, grammar)


def test_abort_leaves_nothing(rt):
    engine = fresh_engine(rt)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=50, temperature=1.0, seed=i,
                                                structured_outputs=SPECS[i % 4]))
           for i, p in enumerate(random_prompts(4, [9, 20], seed=4))]
    for _ in range(3):
        engine.step()
    for rid in ids:
        engine.abort(rid)
    ended = [o for o in engine.step() if o.finished]
    assert sorted(o.request_id for o in ended) == sorted(ids) and {o.finish_reason for o in ended} == {"abort"}
    assert not engine.has_unfinished() and not engine._sequences
    assert engine.stats().free_blocks == engine.pool.n_blocks


def test_grammars_compiled_once_and_cached_lru(rt):
    engine = fresh_engine(rt)
    grammars = engine.grammars
    grammars.cache_size = 2
    a, b, c = (StructuredOutputs(choice=(w,)) for w in ("one", "two", "three"))
    grammars.compile(a)
    grammars.compile(StructuredOutputs(choice=("one",), param="elsewhere"))   # same grammar, other field
    assert grammars.compiles == 1
    grammars.compile(b)
    grammars.compile(a)          # a is now the most recent: c evicts b
    grammars.compile(c)
    grammars.compile(a)
    assert grammars.compiles == 3
    grammars.compile(b)
    assert grammars.compiles == 4


@pytest.mark.parametrize("spec, reason", [
    (StructuredOutputs(json={"type": "strin"}, param="response_format.json_schema.schema"), "strin"),
    (StructuredOutputs(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (StructuredOutputs(regex="([0-9]{4}", param="structured_outputs.regex"), "parenthesis"),
    (StructuredOutputs(grammar='root ::= "a" | ', param="grammar"), "line 1"),
    (StructuredOutputs(grammar='root ::= undefined_rule', param="grammar"), "undefined_rule"),
])
def test_bad_specs_are_refused_naming_the_field(rt, spec, reason):
    with pytest.raises(RequestError) as e:
        rt.engine.add_request([1, 2, 3], SamplingParams(structured_outputs=spec))
    assert e.value.param == spec.param and str(e.value).startswith(spec.param + ":") and reason in str(e.value)
    assert not rt.engine.has_unfinished()


@pytest.mark.parametrize("fields, param", [
    ({}, "structured_outputs"), ({"json": {"type": "object"}, "regex": "a"}, "structured_outputs"),
    ({"choice": []}, "structured_outputs"), ({"choice": ["a", ""]}, "structured_outputs"),
    ({"json": "{not json"}, "structured_outputs"), ({"json": [1]}, "structured_outputs"),
])
def test_malformed_specs_are_field_errors(fields, param):
    with pytest.raises(FieldError) as e:
        StructuredOutputs(**fields)
    assert e.value.param == param


def test_too_expensive_schema_is_refused_in_bounded_time(rt):
    """A schema that takes seconds to compile is refused after the time limit, not waited
    for; the engine keeps serving meanwhile."""
    engine = fresh_engine(rt)
    engine.grammars.timeout = 0.2
    slow = {"type": "object", "required": [f"p{i}" for i in range(120)],
            "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{3,9}@[a-z]{2,8}\\.(com|org)"}
                           for i in range(120)}}
    start = time.monotonic()
    with pytest.raises(RequestError, match="did not compile within 0.2 s") as e:
        engine.add_request([1, 2], SamplingParams(structured_outputs=StructuredOutputs(json=slow, param="json_schema")))
    assert time.monotonic() - start < 5 and e.value.param == "json_schema"
    assert text_of(engine.run([([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0))])[0]) is not None


def test_python_api_shorthands(rt):
    out = rt.generate("Date:", regex=DATE, max_new_tokens=20, temperature=1.0, seed=1)
    assert re.fullmatch(DATE, out)
    outs = rt.generate(["A", "B"], choice=list(CHOICES), max_new_tokens=10, temperature=1.0, seed=2)
    assert all(o in CHOICES for o in outs)
    with pytest.raises(RequestError, match="regex cannot be combined with json_schema"):
        rt.generate("x", json_schema=PERSON, regex=DATE)


def test_python_api_pydantic_model(rt):
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):
        label: str = pydantic.Field(max_length=10)
        count: int = pydantic.Field(ge=1, le=9)

    text = rt.generate("Item:", json_schema=Item, max_new_tokens=60, temperature=1.0, seed=3)
    item = Item.model_validate_json(text)
    assert 1 <= item.count <= 9


# ---------------------------------------------------------------- tool-call arguments in pieces

CALL = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", '
        '"days": [1, {"q": "}\\"]"}]}}\n</tool_call>\nDone <tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>')


@pytest.mark.parametrize("step", [1, 2, 5, len(CALL)])
def test_tool_arguments_stream_in_pieces_that_join_to_the_call(step):
    """However the text arrives, the first call's name comes first, its arguments in pieces
    that join to the model's arguments text exactly; a call written names-last comes whole."""
    parser = ChatTextParser(parse_tools=True)
    deltas = []
    for i in range(0, len(CALL), step):
        deltas += parser.push(CALL[i:i + step])
    deltas += parser.finish()
    calls = tool_calls(deltas)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"location": "Paris", "days": [1, {"q": '}"]'}]}), ("f", {"a": 1})]
    assert calls[0].arguments == '{"location": "Paris", "days": [1, {"q": "}\\"]"}]}'
    starts = [i for i, d in enumerate(deltas) if d.kind == "tool_call"]
    pieces = [d.text for d in deltas[starts[0]:starts[1]] if d.kind == "tool_arguments"]
    assert "".join(pieces) == calls[0].arguments
    assert len(pieces) > 10 if step == 1 else pieces
    assert "".join(d.text for d in deltas if d.kind == "content") == "Checking.\n\nDone "


def test_cut_off_call_keeps_its_arguments_so_far():
    parser = ChatTextParser(parse_tools=True)
    deltas = parser.push('<tool_call>\n{"name": "f", "arguments": {"a": [1, 2') + parser.finish()
    (call,) = tool_calls(deltas)
    assert call.name == "f" and call.arguments == '{"a": [1, 2'


def test_bitmask_rows_of_unconstrained_sequences_are_not_written(rt):
    """fill_bitmasks writes only the sampler state rows it is given."""
    from smollm3_triton.engine.structured_output import fill_bitmasks
    from smollm3_triton.kernels.sampling import SamplingState, allowed_tokens
    state = SamplingState.allocate(3, rt.config.vocab_size, "cpu")
    state.bitmask.fill_(-1)
    c = rt.engine.grammars.constraint(StructuredOutputs(choice=("alpha",)), {2})
    fill_bitmasks(state, [(1, c)])
    assert state.masked.tolist() == [0, 1, 0]
    assert bool((state.bitmask[0] == -1).all()) and bool((state.bitmask[2] == -1).all())
    allowed = allowed_tokens(state, torch.tensor([1]))[0].nonzero().flatten().tolist()
    assert allowed and all(rt.tokenizer.decode([t]) and "alpha".startswith(rt.tokenizer.decode([t])) for t in allowed)


def test_bounded_json_strings_refuse_raw_control_characters(rt):
    """JSON forbids raw control characters in strings (json.loads refuses them): a
    length-bounded string, which xgrammar itself would let them into, refuses them too."""
    import xgrammar as xgr
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}
    compiled = rt.engine.grammars.compile(StructuredOutputs(json=schema))
    for text, ok in (('{"a": "ab\x0cc"}', False), ('{"a": "ab\tc"}', False), ('{"a": "abc"}', True)):
        with pytest.raises(ValueError) if not ok else contextlib.nullcontext():
            json.loads(text)
        assert xgr.GrammarMatcher(compiled).accept_string(text) == ok


def test_structural_tag(rt):
    """A structural tag (xgrammar's format, as vLLM takes it): a tagged JSON answer."""
    answer = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "end": "</answer>",
                                                "content": {"type": "json_schema", "json_schema": answer}}}
    outs = fresh_engine(rt).run([(rt.tokenizer.encode("Answer:"), SamplingParams(
        max_new_tokens=60, temperature=1.0, seed=9, structured_outputs=StructuredOutputs(structural_tag=tag)))])[0]
    match = re.fullmatch(r"<answer>(.*)</answer>", text_of(outs), re.S)
    assert match and outs[-1].finish_reason == "stop", text_of(outs)
    jsonschema.validate(json.loads(match.group(1)), answer)
