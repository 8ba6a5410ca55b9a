"""The `smollm3` CLI, run as a user runs it: a subprocess (`python -m smollm3_triton`).

Oracles: the fact that Paris is France's capital, gguf-py's GGUFReader for what
`inspect` must report of the real GGUF, transformers' config and parameters for a
safetensors folder, llama.cpp's token count of the prompt, the numbers each error message
must state, and `python -X importtime` for what a process imported before it answered.
Each model-loading run costs ~30-60 s on the shared 2-core CI machine, so few runs load
the real model, with few tokens, and the refusals run as parallel processes.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest

TIMING = re.compile(r"^(\d+) tokens in [\d.]+ s(?: \(([\d.]+) tokens/s\))?, prompt (\d+) tokens in [\d.]+ s",
                    re.MULTILINE)


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "smollm3_triton", *map(str, args)], input=stdin or "",
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit status 1 and one `error: ...` line as the whole of stderr; returns the message."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0][len("error: "):]


# ---------------------------------------------------------------- the real model

def test_generate_greedy_names_paris(smollm2_path):
    r = run_cli("generate", "--model", smollm2_path, "--prompt", "What is the capital of France?",
                "--temperature", "0", "-n", "12", "--max-seq-len", "128")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    m = TIMING.search(r.stderr)
    assert m, r.stderr
    n_tokens, rate, n_prompt = int(m.group(1)), m.group(2), int(m.group(3))
    assert 1 <= n_tokens <= 12
    assert rate is None or float(rate) > 0
    if importlib.util.find_spec("llama_cpp") is None:
        return      # the Paris check above stands alone; the prompt count needs the oracle
    import llama_cpp
    # The prompt went through the file's template: render it with plain jinja2 and count
    # its tokens with llama.cpp.
    reader = gguf.GGUFReader(smollm2_path)
    template = jinja2.Environment().from_string(reader.fields["tokenizer.chat_template"].contents())
    text = template.render(messages=[{"role": "user", "content": "What is the capital of France?"}],
                           add_generation_prompt=True)
    vocab = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    assert n_prompt == len(vocab.tokenize(text.encode(), add_bos=False, special=True))


def test_chat_keeps_the_conversation(smollm2_path):
    """Two turns on stdin, then /exit: the second prompt holds the first exchange, and
    the line after /exit is never answered."""
    r = run_cli("chat", "--model", smollm2_path, "--temperature", "0", "-n", "3", "--max-seq-len", "256",
                stdin="What is the capital of France?\nAnd of Germany?\n/exit\nWhat about Spain?\n")
    assert r.returncode == 0, r.stderr
    turns = [(int(m.group(1)), int(m.group(3))) for m in TIMING.finditer(r.stderr)]
    assert len(turns) == 2, r.stderr
    (n1, p1), (_, p2) = turns
    # Turn 2's prompt = turn 1's prompt + the answer + the new user turn, so strictly more
    # than the first prompt and answer together; without history it would be about p1.
    assert p2 > p1 + n1, turns


def test_inspect_real_gguf_matches_gguf_py(smollm2_path):
    r = run_cli("inspect", smollm2_path)
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(smollm2_path)
    out = r.stdout
    arch = reader.fields["general.architecture"].contents()
    assert arch == "llama"
    assert re.search(rf"^architecture: {arch}$", out, re.MULTILINE)
    assert re.search(rf"^  n_layers: {reader.fields['llama.block_count'].contents()}$", out, re.MULTILINE)
    assert re.search(r"^  nope_layers: none", out, re.MULTILINE)   # arch llama: RoPE everywhere
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert f"vocab: {len(tokens)} tokens" in out
    bos = reader.fields["tokenizer.ggml.bos_token_id"].contents()
    eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    assert f"bos: {bos} {tokens[bos]!r}, eos: {eos} {tokens[eos]!r}" in out
    assert f"pre: {reader.fields['tokenizer.ggml.pre'].contents()}" in out

    listed = {m.group(1): (m.group(2), [int(x) for x in m.group(3).split(",")])
              for m in re.finditer(r"^  (\S+)\s+(\w+)\s+\[([\d, ]+)\]$", out, re.MULTILINE)}
    expected = {t.name: (t.tensor_type.name, list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert listed == expected
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    line = next(l for l in out.splitlines() if l.startswith("tensor types: "))
    assert dict((k, int(v)) for k, v in re.findall(r"(\w+): (\d+)", line)) == dict(counts)


@pytest.fixture(scope="module")
def smollm3_folder(tmp_path_factory):
    """A small random SmolLM3 folder carrying SmolLM3's official chat template (thinking mode)."""
    from tests.helpers.gguf_export import random_hf_model, save_hf_folder

    model = random_hf_model("smollm3", hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2)
    folder = save_hf_folder(model, tmp_path_factory.mktemp("smollm3") / "model")
    template = Path(__file__).parent / "data" / "smollm3_chat_template.jinja"
    (folder / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    return model, folder


def test_inspect_safetensors_folder(smollm3_folder):
    """A SmolLM3 folder: config fields and NoPE layers as transformers has them, tensors as saved."""
    model, folder = smollm3_folder
    r = run_cli("inspect", folder)
    assert r.returncode == 0, r.stderr
    cfg = model.config
    out = r.stdout
    assert "architecture: SmolLM3ForCausalLM" in out
    for name, value in [("n_layers", cfg.num_hidden_layers), ("hidden_size", cfg.hidden_size),
                        ("n_heads", cfg.num_attention_heads), ("n_kv_heads", cfg.num_key_value_heads)]:
        assert re.search(rf"^  {name}: {value}$", out, re.MULTILINE), name
    nope = [i for i, rope in enumerate(cfg.no_rope_layers) if not rope]
    assert nope, "the oracle config must have NoPE layers for this check to mean anything"
    assert f"  nope_layers: {nope}" in out
    listed = {m.group(1): (m.group(2), [int(x) for x in m.group(3).split(",")])
              for m in re.finditer(r"^  (\S+)\s+(\w+)\s+\[([\d, ]+)\]$", out, re.MULTILINE)}
    # save_pretrained writes a tied lm_head once, under the embedding's name.
    expected = {n: ("F32", list(p.shape)) for n, p in model.state_dict().items() if n != "lm_head.weight"}
    assert listed == expected


# ---------------------------------------------------------------- bad input
# Each case is its own `python -m smollm3_triton` process; they start together and
# the tests read their results, because a process spends ~10 s importing torch on
# the shared CI cores before it gets to the error.

def write_gpt2_gguf(path):
    """A well-formed GGUF whose architecture this runtime does not run."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, smollm2_path) -> dict[str, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("bad")
    (d / "not_gguf.gguf").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "truncated.gguf").write_bytes(smollm2_path.read_bytes()[:1000])
    write_gpt2_gguf(d / "gpt2.gguf")
    quants = d / "quants"
    quants.mkdir()
    (quants / smollm2_path.name).symlink_to(smollm2_path)
    cases = {
        "missing": ["generate", "--model", d / "absent.gguf", "--prompt", "hi"],
        "not_gguf": ["generate", "--model", d / "not_gguf.gguf", "--prompt", "hi"],
        "truncated": ["generate", "--model", d / "truncated.gguf", "--prompt", "hi"],
        "gpt2": ["generate", "--model", d / "gpt2.gguf", "--prompt", "hi"],
        "inspect_gpt2": ["inspect", d / "gpt2.gguf"],
        "unknown_quant": ["generate", "--model", quants, "--quant", "q5_k_m", "--prompt", "hi"],
        "temperature": ["generate", "--prompt", "hi", "--temperature", "-1"],
        "context": ["generate", "--model", smollm2_path, "--prompt", "Hello", "--max-seq-len", "16", "-n", "20"],
        "context_default_n": ["generate", "--model", smollm2_path, "--prompt", "Hello", "--max-seq-len", "16"],
        "thinking": ["generate", "--model", smollm2_path, "--prompt", "Hello", "--thinking"],
        "usage": ["generate", "-n", "many"],
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    procs = {name: subprocess.Popen([sys.executable, "-m", "smollm3_triton", *map(str, args)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
             for name, args in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case,expect", [
    ("missing", r"absent\.gguf: no such file"),
    ("not_gguf", r"not_gguf\.gguf: magic .*expected b'GGUF'"),
    ("truncated", r"truncated\.gguf: .*only \d+ follow"),
    ("gpt2", r"gpt2\.gguf: architecture 'gpt2' is not supported"),
])
def test_bad_model_file(bad_runs, case, expect):
    msg = assert_error_line(bad_runs[case])
    assert re.search(expect, msg), msg


def test_inspect_unknown_arch_lists_tensors_then_fails(bad_runs):
    r = bad_runs["inspect_gpt2"]
    assert "architecture: gpt2" in r.stdout
    assert re.search(r"^  token_embd\.weight\s+F32\s+\[16, 8\]$", r.stdout, re.MULTILINE), r.stdout
    assert "not supported" in assert_error_line(r)


def test_unknown_quant_lists_available(bad_runs):
    msg = assert_error_line(bad_runs["unknown_quant"])
    # The packaged file is named ...Q4_1.gguf: the only quant the folder has.
    assert "'q5_k_m'" in msg and "available quants: q4_1" in msg, msg


def test_bad_temperature(bad_runs):
    msg = assert_error_line(bad_runs["temperature"])
    assert "temperature" in msg and "-1" in msg, msg


def test_context_overflow_states_both_numbers(bad_runs):
    msg = assert_error_line(bad_runs["context"])
    assert re.search(r"prompt \(\d+ tokens\) \+ --max-new-tokens \(20\)", msg), msg
    assert "context of 16 tokens" in msg and "--max-seq-len" in msg, msg


def test_default_max_new_tokens_is_the_librarys(bad_runs):
    """Without -n the request asks for SamplingParams' default (256), as the README says;
    a prompt that fills the context alone is refused with that number."""
    from smollm3_triton.sampling_params import SamplingParams

    msg = assert_error_line(bad_runs["context_default_n"])
    assert SamplingParams().max_new_tokens == 256
    assert re.search(r"prompt \(\d+ tokens\) \+ --max-new-tokens \(256\)", msg), msg


def test_thinking_on_a_model_without_it_is_refused(bad_runs):
    """SmolLM2's template has no thinking mode: --thinking is an error naming the flag."""
    msg = assert_error_line(bad_runs["thinking"])
    assert msg.startswith("--thinking ") and "has no thinking mode" in msg, msg


def test_thinking_on_smollm3(smollm3_folder):
    """The same flag on SmolLM3's template is taken, both ways: the prompt has as many tokens
    as transformers' apply_chat_template gives with enable_thinking on and off (on: the
    system block with the reasoning instructions; off: /no_think and an empty think block)."""
    from transformers import AutoTokenizer

    _, folder = smollm3_folder
    hf = AutoTokenizer.from_pretrained(str(folder))
    for flag, thinking in (("--thinking", True), ("--no-thinking", False)):
        r = run_cli("generate", "--model", folder, "--backend", "torch", "-p", "Hi", flag, "-n", "1",
                    "--temperature", "0", "--max-seq-len", "512")
        assert r.returncode == 0, r.stderr
        expected = hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                          enable_thinking=thinking, tokenize=True, return_dict=False)
        assert int(TIMING.search(r.stderr).group(3)) == len(expected), (flag, r.stderr)


def test_usage_error_is_one_line_exit_2(bad_runs):
    r = bad_runs["usage"]
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: argument -n/--max-new-tokens/--sample-len: invalid int value: 'many' "
        "(see `smollm3 generate --help`)"], r.stderr


def test_default_max_new_tokens_is_cut_to_the_context(smollm2_path):
    """Without -n, a prompt with less than 256 tokens of room gets exactly the room: a greedy
    count that never ends on its own stops at the context's last position."""
    r = run_cli("generate", "--model", smollm2_path, "--no-chat-template", "--temperature", "0",
                "--prompt", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    m = TIMING.search(r.stderr)
    n_tokens, n_prompt = int(m.group(1)), int(m.group(3))
    assert n_tokens == 64 - n_prompt, (n_tokens, n_prompt, r.stdout)
    assert r.stdout.startswith(" 11, 12, 13, 14, 15,"), r.stdout


# ---------------------------------------------------------------- start-up
# What a process imported before it answered, from `python -X importtime`'s own log.

HEAVY = ("torch", "triton", "transformers", "fastapi", "numpy", "tokenizers")


def imported_heavy(stderr: str) -> set[str]:
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", stderr, re.MULTILINE)
    assert names, "no -X importtime log"
    return {n.split(".")[0] for n in names} & set(HEAVY)


def test_importing_the_cli_imports_nothing_heavy():
    r = subprocess.run([sys.executable, "-c", "import sys, smollm3_triton.cli; "
                        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("args, status, expect", [
    (["--help"], 0, None),
    (["generate", "--help"], 0, None),
    (["generate", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["generate", "--temperature", "-1", "-p", "hi"], 1, "--temperature must be >= 0 (0 is greedy), got -1.0"),
    (["generate", "-n", "0", "-p", "hi"], 1, "--max-new-tokens must be >= 1, got 0"),
    (["generate", "--top-p", "1.5", "-p", "hi"], 1, "--top-p must be in (0, 1]"),
    (["perplexity", "-c", "2", "-f", "x.txt"], 2, "argument -c/--ctx-size: must be >= 3, got 2"),
    (["serve", "--port", "70000"], 2, "argument --port: must be in 1..65535, got 70000"),
    (["bench", "--contexts", "0"], 2, "argument --contexts: values must be integers >= 1, got '0'"),
    (["generate", "--quant", "q4_k_m", "-p", "hi"], 2, "--quant needs --model"),
])
def test_answers_before_importing_torch(args, status, expect):
    """--help and every refusal that needs no model answer without importing torch (or
    triton, transformers, ...): one `error: ...` line, exit 2 for usage, 1 for a bad value."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "smollm3_triton", *args], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == status, r.stderr[-2000:]
    assert imported_heavy(r.stderr) == set()
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    if expect is None:
        assert errors == [] and "usage: smollm3" in r.stdout
    else:
        assert len(errors) == 1 and errors[0].startswith("error: ") and expect in errors[0], errors
