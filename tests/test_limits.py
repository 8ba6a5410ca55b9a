"""The API's stated limits: the context boundary on both sides, exactly at the limit,
and every numeric argument range-checked with a RequestError naming the argument
and the value.

The model is a small random SmolLM3 exported as GGUF by tests/gguf_export.py (it
carries the real SmolLM2 tokenizer), its end-of-text rows of the tied embedding
zeroed: their logits are then exactly 0 while the best of 49k random logits is
far above, so greedy decoding never stops early and really fills the context.
Oracle for the tokens generated at the boundary: transformers' greedy decoding of
the very model that was exported (fp32, full forward each step).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smollm3_triton import Runtime
from smollm3_triton.engine.sampler import SamplerState
from smollm3_triton.engine.sampler import sample as sample_batch
from smollm3_triton.errors import RequestError
from smollm3_triton.sampling_params import SamplingParams, check_max_seq_len
from tests.helpers.cpu_time import own_cpu_seconds
from tests.helpers.gguf_export import export_gguf, random_hf_model, smollm2_tokenizer

N = 24                       # max_seq_len the runtime is loaded with
MAX_POSITIONS = 32           # the model's max_position_embeddings
PROMPT = "The quick brown fox jumps"
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    hf = random_hf_model("smollm3", seed=5, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS)
    tok = smollm2_tokenizer()
    tokens = tok["tokenizer.ggml.tokens"]
    silenced = {tokens.index(t) for t in END_TOKENS if t in tokens} | {tok["tokenizer.ggml.eos_token_id"]}
    with torch.no_grad():
        hf.model.embed_tokens.weight[sorted(silenced)] = 0.0
    path = export_gguf(hf, tmp_path_factory.mktemp("limits") / "tiny.gguf", "f32")
    return hf, path, silenced


@pytest.fixture(scope="module")
def rt(exported):
    hf, path, silenced = exported
    runtime = Runtime.load(path, device="cpu", backend="torch", max_seq_len=N)
    assert runtime.model.max_seq_len == N
    assert runtime.eos_ids <= silenced, "every id the runtime stops on must be one whose logit was silenced"
    return runtime


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def assert_request_error(fn, *needles) -> str:
    with pytest.raises(RequestError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# ---------------------------------------------------------------- the context boundary

def test_exactly_at_the_limit_generates_every_token(rt, exported):
    hf = exported[0]
    prompt_ids = rt.tokenizer.encode(PROMPT)
    p = len(prompt_ids)
    room = N - p
    assert room > 4
    params = SamplingParams(max_new_tokens=room, temperature=0, stop=None)
    tokens = list(rt.generate_ids(prompt_ids, params))
    assert len(tokens) == room and not set(tokens) & rt.eos_ids
    assert tokens == hf_greedy(hf, prompt_ids, room)
    text = rt.generate(PROMPT, max_new_tokens=room, temperature=0, stop=None)
    assert text == rt.tokenizer.decode(tokens)
    print(f"\nprompt {p} tokens + {room} generated = {p + room} = max_seq_len {N}; equal to transformers' greedy")


def test_one_past_the_limit_is_refused_before_any_work(rt):
    p = len(rt.tokenizer.encode(PROMPT))
    over = N - p + 1
    for call in (lambda: rt.generate(PROMPT, max_new_tokens=over, temperature=0),
                 lambda: rt.stream(PROMPT, max_new_tokens=over, temperature=0),  # at the call, not at next()
                 lambda: rt.generate_ids(rt.tokenizer.encode(PROMPT), SamplingParams(max_new_tokens=over))):
        msg = assert_request_error(call, f"prompt ({p} tokens)", f"max_new_tokens ({over})", f"= {N + 1}",
                                   f"context of {N} tokens", f"at most {N - p}")
    print(f"\n{msg}")


def test_prompt_alone_longer_than_the_context(rt):
    long_prompt = " ".join(["word"] * (2 * N))
    p = len(rt.tokenizer.encode(long_prompt))
    assert p > N
    assert_request_error(lambda: rt.generate(long_prompt, max_new_tokens=1), f"prompt ({p} tokens)",
                         f"context of {N} tokens", "the prompt alone fills it")


def test_logits_at_the_limit(rt, exported):
    hf = exported[0]
    ids = [int(i) for i in np.random.default_rng(1).integers(0, rt.config.vocab_size, N)]
    ours = rt.logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == (N, rt.config.vocab_size)
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err <= 1e-4, err  # fp32 both, same weights: summation order only
    assert_request_error(lambda: rt.logits(ids + [0]), f"{N + 1} tokens", f"context of {N} tokens")


# ---------------------------------------------------------------- numeric request fields

BAD_PARAMS = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.7"),
    ("temperature", True), ("temperature", None),
    ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", -0.1),
    ("top_k", -1), ("top_k", 2.5), ("top_k", "5"), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("max_new_tokens", 0), ("max_new_tokens", -5), ("max_new_tokens", 3.0), ("max_new_tokens", True),
    ("max_new_tokens", None),
    ("seed", -1), ("seed", 2**63), ("seed", 2**64), ("seed", 1.5), ("seed", "42"), ("seed", True),
]


@pytest.mark.parametrize("name,value", BAD_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMS])
def test_numeric_field_refused(name, value):
    assert_request_error(lambda: SamplingParams(**{name: value}), name, repr(value))


@pytest.mark.parametrize("stop,shown", [
    ([1], "stop[0]"), ([""], "stop[0]"), (["ok", None], "stop[1]"), (["ok", ""], "stop[1]"), (5, "stop"),
    (b"\n", "stop"), ({"a": 1}, "stop"),
])
def test_stop_refused(stop, shown):
    msg = assert_request_error(lambda: SamplingParams(stop=stop), shown)
    assert repr(stop[-1] if isinstance(stop, list) else stop) in msg


@pytest.mark.parametrize("kwargs,check", [
    (dict(temperature=0), lambda p: p.temperature == 0.0),
    (dict(top_p=1), lambda p: p.top_p == 1.0 and isinstance(p.top_p, float)),
    (dict(top_k=0), lambda p: p.top_k == 0),
    (dict(min_p=1), lambda p: p.min_p == 1.0),
    (dict(seed=0), lambda p: p.seed == 0),
    (dict(seed=2**63 - 1), lambda p: p.seed == 2**63 - 1),
    (dict(temperature=np.float32(0.5), top_k=np.int64(3), max_new_tokens=np.int32(7)),
     lambda p: (p.temperature, p.top_k, p.max_new_tokens) == (0.5, 3, 7) and type(p.top_k) is int
     and type(p.temperature) is float),
    (dict(stop="\n"), lambda p: p.stop == ("\n",)),
    (dict(stop=None), lambda p: p.stop == ()),
    (dict(stop=["a", "bc"]), lambda p: p.stop == ("a", "bc")),
])
def test_edge_values_accepted(kwargs, check):
    assert check(SamplingParams(**kwargs))


def test_range_checks_reach_the_runtime(rt):
    assert_request_error(lambda: rt.generate(PROMPT, max_new_tokens=0), "max_new_tokens", "0")
    assert_request_error(lambda: rt.stream(PROMPT, temperature=-1), "temperature", "-1")
    assert_request_error(lambda: rt.chat([{"role": "user", "content": "hi"}], top_p=0), "top_p", "0")


def test_tiny_temperature_is_greedy_not_nan(rt):
    """softmax(l / T) tends to one-hot on argmax(l) as T -> 0; 1e-300 must not overflow into NaN."""
    for seed in range(5):
        logits = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 10
        params = SamplingParams(temperature=1e-300, seed=seed)
        assert int(sample_batch(logits[None], [SamplerState.start(params)], [([], [])])[0]) == int(logits.argmax())
    greedy = rt.generate(PROMPT, max_new_tokens=4, temperature=0)
    assert rt.generate(PROMPT, max_new_tokens=4, temperature=1e-300, seed=1) == greedy


# ---------------------------------------------------------------- the prompt and token ids

@pytest.mark.parametrize("prompt,needle", [("", "the prompt is empty"), (None, "prompt must be a string"),
                                           (5, "prompt must be a string"), (["hi", 5], "prompt must be a string")])
def test_bad_prompt(rt, prompt, needle):
    assert_request_error(lambda: rt.generate(prompt, max_new_tokens=1), needle)


@pytest.mark.parametrize("ids,needles", [
    ([-1], ["token_ids[0] = -1", "0..49151"]),
    ([5, 49152], ["token_ids[1] = 49152", "0..49151"]),
    ([5, 2**40], ["token_ids[1] = 1099511627776"]),
    ([0, 1.5], ["token_ids[1]", "1.5"]),
    ([0, "7"], ["token_ids[1]", "'7'"]),
    ([True], ["token_ids[0]", "True"]),
    ([], ["token_ids is empty"]),
    ("abc", ["token_ids", "str"]),
    (7, ["token_ids", "int"]),
    (torch.tensor([[1, 2]]), ["1-D integer tensor", "(1, 2)"]),
    (torch.tensor([1.0, 2.0]), ["1-D integer tensor", "float32"]),
    (np.array([3, 49152]), ["token_ids[1] = 49152"]),
])
def test_logits_token_ids_refused(rt, ids, needles):
    assert_request_error(lambda: rt.logits(ids), *needles)


def test_logits_accepts_integer_containers(rt):
    ids = [1, 17, 400, 49151]
    ref = rt.logits(ids)
    for same in (tuple(ids), np.array(ids, dtype=np.int32), torch.tensor(ids, dtype=torch.int32),
                 [np.int64(i) for i in ids]):
        assert torch.equal(rt.logits(same), ref)


# ---------------------------------------------------------------- max_seq_len at load

@pytest.mark.parametrize("value", [0, -1, 2.5, "8", True, None])
def test_max_seq_len_refused(value, rt):
    assert_request_error(lambda: check_max_seq_len(value, rt.config, torch.float32, torch.device("cpu")),
                         "max_seq_len", repr(value))


def test_max_seq_len_that_can_never_fit_is_refused_without_allocating(rt):
    with own_cpu_seconds() as cpu:
        assert_request_error(lambda: check_max_seq_len(10**13, rt.config, torch.float32, torch.device("cpu")),
                             "max_seq_len 10000000000000", "GiB")
    assert cpu.seconds < 0.1


def test_runtime_load_checks_max_seq_len(exported):
    path = exported[1]
    assert_request_error(lambda: Runtime.load(path, device="cpu", backend="torch", max_seq_len=0),
                         "max_seq_len", "0")


def test_beyond_trained_positions_warns_and_works(exported):
    """Decision (llama.cpp's, which allows n_ctx > n_ctx_train with a warning): allowed, with a warning."""
    hf, path, _ = exported
    n = MAX_POSITIONS + 8
    with pytest.warns(UserWarning, match=rf"max_seq_len {n} exceeds the {MAX_POSITIONS} positions"):
        runtime = Runtime.load(path, device="cpu", backend="torch", max_seq_len=n)
    ids = [int(i) for i in np.random.default_rng(2).integers(0, runtime.config.vocab_size, n)]
    ours = runtime.logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # transformers computes RoPE past the table the same way
    assert math.isfinite(float(ours.abs().max()))
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-4
