"""Broken and hostile model folders (config.json + safetensors) and the semantic
checks on GGUF files: what the header parsers cannot see.

Every refusal must be one of smollm3_triton.errors' types (ModelFormatError for
missing, mistyped or contradictory input; UnsupportedModelError for valid input
this runtime does not compute) whose message names the file and the field or
tensor; never a KeyError / TypeError / AssertionError from deep inside.

The oracles: the layouts transformers' SmolLM3 / Llama modules define (shapes
written out below from their nn.Linear definitions), transformers' documented
config semantics, and the safetensors and gguf-py libraries that write the files.
"""
from __future__ import annotations

import json
import math
import random
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType as VT
from gguf import GGUFWriter
from safetensors.torch import save_file

from smollm3_triton import Runtime
from smollm3_triton.config import MAX_LAYERS, ModelConfig
from smollm3_triton.errors import ModelFormatError, UnsupportedModelError
from smollm3_triton.gguf.reader import GGUFFile
from smollm3_triton.weights import MAX_JSON_BYTES, check_gguf, load_gguf, load_safetensors_folder
from tests.helpers.cpu_time import own_cpu_seconds

OURS = (ModelFormatError, UnsupportedModelError)
DELETE = object()

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV = 64, 32, 48, 2, 4, 2


# ---------------------------------------------------------------- safetensors folders

def hf_config(kind: str = "smollm3", **changes) -> dict:
    """A config.json laid out as transformers 5's save_pretrained writes it."""
    cfg = {
        "architectures": ["SmolLM3ForCausalLM" if kind == "smollm3" else "LlamaForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "float32",
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": INTER, "max_position_embeddings": 128, "mlp_bias": False, "model_type": kind,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV, "pad_token_id": 2,
        "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "use_cache": True, "vocab_size": VOCAB,
    }
    if kind == "smollm3":
        cfg.update({"layer_types": ["full_attention"] * LAYERS, "no_rope_layer_interval": 4,
                    "no_rope_layers": [1, 0], "rope_parameters": {"rope_theta": 5000000.0, "rope_type": "default"},
                    "sliding_window": None, "use_sliding_window": False})
    else:
        cfg.update({"head_dim": HIDDEN // HEADS, "pretraining_tp": 1,
                    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    for key, value in changes.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def hf_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the shapes of transformers' modules: nn.Linear(in, out).weight is [out, in]."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    if cfg.get("tie_word_embeddings") is False:
        shapes["lm_head.weight"] = (vocab, h)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def write_folder(folder: Path, cfg: dict | str | bytes | None, tensors: dict[str, torch.Tensor] | None,
                 shards: list[list[str]] | None = None, index: dict | bytes | None = None) -> Path:
    """config.json (a dict, or raw text / bytes) and model.safetensors, or the tensors split into shards."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        data = cfg if isinstance(cfg, bytes) else (cfg if isinstance(cfg, str) else json.dumps(cfg)).encode()
        (folder / "config.json").write_bytes(data)
    if tensors is not None and shards is None:
        save_file(tensors, str(folder / "model.safetensors"))
    if shards is not None:
        weight_map = {}
        for k, names in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(folder / file))
            weight_map.update({n: file for n in names})
        if index is None:
            index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    if index is not None:
        data = index if isinstance(index, bytes) else json.dumps(index).encode()
        (folder / "model.safetensors.index.json").write_bytes(data)
    return folder


def refused(error, pattern: str, folder: Path, *names: str) -> str:
    """load_safetensors_folder(folder) raises exactly `error`, matching `pattern` and naming every one of `names`."""
    with pytest.raises(OURS) as info:
        load_safetensors_folder(folder)
    msg = str(info.value)
    assert type(info.value) is error, msg
    assert re.search(pattern, msg), (pattern, msg)
    for name in names:
        assert name in msg, (name, msg)
    return msg


def test_valid_folder_loads_with_its_values(tmp_path):
    cfg = hf_config()
    tensors = hf_tensors(cfg)
    config, weights = load_safetensors_folder(write_folder(tmp_path, cfg, tensors))
    assert (config.arch, config.vocab_size, config.hidden_size, config.intermediate_size, config.n_layers,
            config.n_heads, config.n_kv_heads, config.head_dim) == ("smollm3", VOCAB, HIDDEN, INTER, LAYERS,
                                                                   HEADS, KV, HIDDEN // HEADS)
    assert config.use_rope == (True, False) and config.rope_theta == 5e6 and config.tie_word_embeddings
    p = "model.layers.1."
    qkv = torch.cat([tensors[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(weights.layers[1].qkv.dequantize(), qkv)
    assert torch.equal(weights.layers[1].down.dequantize(), tensors[p + "mlp.down_proj.weight"])
    assert torch.equal(weights.layers[1].ffn_norm, tensors[p + "post_attention_layernorm.weight"])
    assert weights.lm_head is weights.embed


# --- config.json itself

def test_config_json_missing(tmp_path):
    refused(ModelFormatError, r"config.json is missing", write_folder(tmp_path, None, hf_tensors(hf_config())))


@pytest.mark.parametrize("text,problem", [
    ("{", r"not valid JSON"),
    ("", r"not valid JSON"),
    (b"\xff\xfe{}", r"not valid JSON"),
    pytest.param("[" * 100_000, r"not valid JSON", id="nesting past the recursion limit"),
    ("[1, 2]", r"expected a JSON object, got list"),
    ('"LlamaForCausalLM"', r"expected a JSON object, got str"),
    ("null", r"expected a JSON object, got NoneType"),
])
def test_config_json_not_an_object(text, problem, tmp_path):
    folder = write_folder(tmp_path, text, hf_tensors(hf_config()))
    refused(ModelFormatError, problem, folder, str(folder / "config.json"))


def test_config_json_too_large_is_not_read(tmp_path):
    folder = write_folder(tmp_path, None, hf_tensors(hf_config()))
    with open(folder / "config.json", "wb") as fh:
        fh.truncate(MAX_JSON_BYTES + 1)  # sparse: costs no disk and would cost 16 MiB to read
    refused(ModelFormatError, rf"{MAX_JSON_BYTES + 1} bytes, more than", folder, "config.json")


# --- fields: (changes, error, pattern, the field name the message must carry)
F, U = ModelFormatError, UnsupportedModelError
CONFIG_CASES = {
    "hidden_size missing": (dict(hidden_size=DELETE), F, r"field hidden_size is missing", "hidden_size"),
    "vocab_size null": (dict(vocab_size=None), F, r"field vocab_size is missing", "vocab_size"),
    "num_hidden_layers missing": (dict(num_hidden_layers=DELETE), F, r"is missing", "num_hidden_layers"),
    "num_attention_heads missing": (dict(num_attention_heads=DELETE), F, r"is missing", "num_attention_heads"),
    "intermediate_size missing": (dict(intermediate_size=DELETE), F, r"is missing", "intermediate_size"),
    "max_position_embeddings missing": (dict(max_position_embeddings=DELETE), F, r"is missing",
                                        "max_position_embeddings"),
    "hidden not divisible by heads": (dict(hidden_size=30), F,
                                      r"hidden_size \(30\) is not divisible by num_attention_heads \(4\) and there "
                                      r"is no head_dim", "hidden_size"),
    "kv heads do not divide heads": (dict(num_key_value_heads=3), F,
                                     r"num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)",
                                     "num_key_value_heads"),
    "odd head_dim": (dict(hidden_size=36, head_dim=9), F, r"head_dim gives a head dim of 9, which must be even for RoPE", "head_dim"),
    "no_rope_layers too short": (dict(no_rope_layers=[1]), F, r"has 1 entries but num_hidden_layers is 2",
                                 "no_rope_layers"),
    "no_rope_layers value 2": (dict(no_rope_layers=[1, 2]), F, r"\[1\] is 2; entries must be 1 \(RoPE\) or 0",
                               "no_rope_layers"),
    "no_rope_layers value 0.5": (dict(no_rope_layers=[0.5, 1]), F, r"\[0\] is 0.5", "no_rope_layers"),
    "no_rope_layers string entry": (dict(no_rope_layers=["1", 1]), F, r"\[0\] is '1'", "no_rope_layers"),
    "no_rope_layers not a list": (dict(no_rope_layers=4), F, r"must be a list with a 0 or 1 per layer, got 4",
                                  "no_rope_layers"),
    "no_rope_layer_interval zero": (dict(no_rope_layers=None, no_rope_layer_interval=0), F, r"must be >= 1, got 0",
                                    "no_rope_layer_interval"),
    "negative hidden_size": (dict(hidden_size=-32), F, r"must be >= 1, got -32", "hidden_size"),
    "zero layers": (dict(num_hidden_layers=0), F, rf"must be in 1..{MAX_LAYERS}, got 0", "num_hidden_layers"),
    "a billion layers": (dict(num_hidden_layers=10**9), F, rf"must be in 1..{MAX_LAYERS}, got 1000000000",
                         "num_hidden_layers"),
    "zero vocab": (dict(vocab_size=0), F, r"must be >= 1, got 0", "vocab_size"),
    "zero heads": (dict(num_attention_heads=0), F, r"must be >= 1, got 0", "num_attention_heads"),
    "negative kv heads": (dict(num_key_value_heads=-2), F, r"must be >= 1, got -2", "num_key_value_heads"),
    "size as string": (dict(hidden_size="32"), F, r"must be an integer, got '32'", "hidden_size"),
    "size as float": (dict(intermediate_size=48.0), F, r"must be an integer, got 48.0", "intermediate_size"),
    "size as bool": (dict(num_hidden_layers=True), F, r"must be an integer, got True", "num_hidden_layers"),
    "size as list": (dict(vocab_size=[64]), F, r"must be an integer, got \[64\]", "vocab_size"),
    "heads as fraction": (dict(num_attention_heads=4.5), F, r"must be an integer, got 4.5", "num_attention_heads"),
    "rms_norm_eps negative": (dict(rms_norm_eps=-1e-5), F, r"must be > 0", "rms_norm_eps"),
    "rms_norm_eps NaN": (dict(rms_norm_eps=float("nan")), F, r"must be a finite number, got nan", "rms_norm_eps"),
    "rms_norm_eps string": (dict(rms_norm_eps="1e-5"), F, r"must be a finite number, got '1e-5'", "rms_norm_eps"),
    "rope_theta zero": (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), F, r"must be > 0, got 0",
                        "rope_parameters.rope_theta"),
    "rope_theta infinite": (dict(rope_parameters={"rope_type": "default", "rope_theta": float("inf")}), F,
                            r"must be a finite number, got inf", "rope_parameters.rope_theta"),
    "rope_parameters a string": (dict(rope_parameters="default"), F, r"must be an object", "rope_parameters"),
    "tie_word_embeddings a string": (dict(tie_word_embeddings="yes"), F, r"must be true or false, got 'yes'",
                                     "tie_word_embeddings"),
    "eos id past the vocabulary": (dict(eos_token_id=VOCAB), F, rf"{VOCAB} is not a token id in 0..{VOCAB - 1}",
                                   "eos_token_id"),
    "eos list with a bad id": (dict(eos_token_id=[2, 999]), F, r"999 is not a token id", "eos_token_id"),
    "negative pad id": (dict(pad_token_id=-1), F, r"-1 is not a token id", "pad_token_id"),
    "bos id as string": (dict(bos_token_id="1"), F, r"'1' is not a token id", "bos_token_id"),
    # what the model is
    "unknown model_type": (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), U,
                           r"model_type 'qwen2' is not supported", "model_type"),
    "unknown architecture only": (dict(model_type=DELETE, architectures=["Qwen2ForCausalLM"]), U,
                                  r"names no supported model class", "architectures"),
    "not a causal LM": (dict(architectures=["LlamaForSequenceClassification"]), U, r"names no supported model class",
                        "architectures"),
    "architectures a string": (dict(architectures="SmolLM3ForCausalLM"), F, r"must be a list of class names",
                               "architectures"),
    "model_type contradicts architectures": (dict(architectures=["LlamaForCausalLM"]), F,
                                             r"model_type 'smollm3' contradicts architectures", "model_type"),
    "neither model_type nor architectures": (dict(model_type=DELETE, architectures=DELETE), F,
                                             r"neither model_type nor architectures", "config.json"),
    "hidden_act gelu": (dict(hidden_act="gelu"), U, r"'gelu' is not supported \(only silu\)", "hidden_act"),
    "hidden_act not a string": (dict(hidden_act=1), F, r"must be a string, got 1", "hidden_act"),
    "attention_bias": (dict(attention_bias=True), U, r"bias terms are not supported", "attention_bias"),
    "mlp_bias": (dict(mlp_bias=True), U, r"bias terms are not supported", "mlp_bias"),
    "rope scaling llama3": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), U,
                            r"'llama3' is not supported \(only yarn\)", "rope_parameters.rope_type"),
    "legacy rope_scaling dynamic": (dict(rope_parameters=DELETE, rope_theta=1e4,
                                         rope_scaling={"type": "dynamic", "factor": 2.0}), U,
                                    r"'dynamic' is not supported", "rope_scaling."),
    "yarn with a zero factor": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 0,
                                                      "original_max_position_embeddings": 64}), F,
                                r"must be > 0, got 0", "rope_parameters.factor"),
    "partial rotary": (dict(partial_rotary_factor=0.5), U, r"partial RoPE is not supported", "partial_rotary_factor"),
    "per-layer-type rope": (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}), U,
                            r"nested per layer type", "rope_parameters"),
    "sliding window": (dict(use_sliding_window=True, sliding_window=4096), U,
                       r"sliding-window attention is not supported", "use_sliding_window"),
    "sliding layer type": (dict(layer_types=["full_attention", "sliding_attention"]), U,
                           r"\[1\] is 'sliding_attention': only full_attention", "layer_types"),
    "layer_types too short": (dict(layer_types=["full_attention"]), F, r"has 1 entries but num_hidden_layers is 2",
                              "layer_types"),
    "pre-quantized": (dict(quantization_config={"quant_method": "gptq", "bits": 4}), U,
                      r"quant_method 'gptq'.*not supported", "quantization_config"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_field_refused(case, tmp_path):
    changes, error, pattern, field = CONFIG_CASES[case]
    base = hf_config()
    folder = write_folder(tmp_path, hf_config(**changes), hf_tensors(base))
    refused(error, pattern, folder, str(folder / "config.json"), field)


@pytest.mark.parametrize("changes,check", [
    # transformers documents no_rope_layers as "at least" one entry per layer; extra ones are unused
    (dict(no_rope_layers=[0, 1, 0, 0]), lambda c: c.use_rope == (False, True)),
    (dict(no_rope_layers=[True, False]), lambda c: c.use_rope == (True, False)),
    (dict(no_rope_layers=None, no_rope_layer_interval=2), lambda c: c.use_rope == (True, False)),
    (dict(rope_parameters=DELETE), lambda c: c.rope_theta == 2e6),  # SmolLM3Config.default_theta
    (dict(rope_parameters=DELETE, rope_theta=123.0, rope_scaling=None), lambda c: c.rope_theta == 123.0),
    (dict(num_key_value_heads=None), lambda c: c.n_kv_heads == HEADS),
    (dict(model_type=DELETE), lambda c: c.arch == "smollm3"),
    (dict(architectures=DELETE), lambda c: c.arch == "smollm3"),
    (dict(eos_token_id=[2, VOCAB - 1], bos_token_id=None), lambda c: True),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                           "original_max_position_embeddings": 32}),
     lambda c: (c.rope_scaling.factor, c.rope_scaling.original_max_position_embeddings) == (4.0, 32)),
    # transformers: a null yarn factor is max_position_embeddings / original
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": None,
                           "original_max_position_embeddings": 32}), lambda c: c.rope_scaling.factor == 4.0),
])
def test_config_variants_accepted(changes, check, tmp_path):
    cfg = hf_config(**changes)
    config, _ = load_safetensors_folder(write_folder(tmp_path, cfg, hf_tensors(cfg)))
    assert check(config), config


def test_head_dim_given_allows_any_hidden_size(tmp_path):
    cfg = hf_config("llama", hidden_size=36, head_dim=8)
    config, weights = load_safetensors_folder(write_folder(tmp_path, cfg, hf_tensors(cfg)))
    assert (config.head_dim, weights.layers[0].o.shape) == (8, (36, HEADS * 8))


HOSTILE_VALUES = [None, -1, 0, 1, 3, 2**40, -2**63, 1.5, float("nan"), float("inf"), "", "x", [], [1], {}, True, False]


def test_every_field_with_hostile_values():
    """Each config field set to each hostile value: a ModelConfig or our error, nothing else."""
    base = hf_config()
    accepted = refused_count = 0
    slowest = 0.0
    for key in base:
        for value in HOSTILE_VALUES:
            cfg = dict(base, **{key: value})
            with own_cpu_seconds() as cpu:
                try:
                    ModelConfig.from_hf_config(cfg, "config.json")
                    accepted += 1
                except OURS as e:
                    assert "config.json" in str(e)
                    refused_count += 1
            slowest = max(slowest, cpu.seconds)
    print(f"\nconfig sweep: {len(base)} fields x {len(HOSTILE_VALUES)} values: {refused_count} refused, "
          f"{accepted} accepted, slowest {slowest * 1e3:.2f} ms")
    assert refused_count > 100 and slowest < 0.1


# --- the safetensors files

def test_no_safetensors_files(tmp_path):
    refused(ModelFormatError, r"no \*\.safetensors files", write_folder(tmp_path, hf_config(), None))


@pytest.fixture
def valid_file(tmp_path) -> tuple[Path, bytes, int]:
    folder = write_folder(tmp_path / "m", hf_config(), hf_tensors(hf_config()))
    data = (folder / "model.safetensors").read_bytes()
    return folder, data, 8 + struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("cut", ["last byte", "half the data", "inside the header", "inside the length", "empty"])
def test_truncated_safetensors(cut, valid_file):
    folder, data, header_end = valid_file
    keep = {"last byte": len(data) - 1, "half the data": (header_end + len(data)) // 2,
            "inside the header": header_end // 2, "inside the length": 5, "empty": 0}[cut]
    (folder / "model.safetensors").write_bytes(data[:keep])
    refused(ModelFormatError, r"not a valid safetensors file", folder, str(folder / "model.safetensors"))


def test_truncation_sweep(valid_file):
    """About 200 cuts spread through the length field and the JSON header, and some through the data."""
    folder, data, header_end = valid_file
    path = folder / "model.safetensors"
    cuts = list(range(0, header_end + 1, max(1, header_end // 200))) + list(range(header_end + 1, len(data), 997))
    for n in cuts:
        path.write_bytes(data[:n])
        with pytest.raises(ModelFormatError, match="not a valid safetensors file"):
            load_safetensors_folder(folder)
    print(f"\nsafetensors truncation sweep: {len(cuts)} prefixes refused")


def _rewrite_header(data: bytes, header_end: int, edit) -> bytes:
    header = json.loads(data[8:header_end])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[header_end:]


@pytest.mark.parametrize("lie", ["offsets past the end", "overlapping offsets", "shape bigger than its bytes",
                                 "header length past the file", "header length 2^63", "header not JSON",
                                 "unknown dtype", "negative dimension"])
def test_header_that_lies(lie, valid_file):
    folder, data, header_end = valid_file
    name = "model.layers.0.mlp.down_proj.weight"

    def grow_last(h):  # the last tensor claims 4 KiB more than the file holds, shape to match
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        h[last]["data_offsets"][1] += 4096
        h[last]["shape"] = [(h[last]["data_offsets"][1] - h[last]["data_offsets"][0]) // 4]

    edits = {
        "offsets past the end": lambda: _rewrite_header(data, header_end, grow_last),
        "overlapping offsets": lambda: _rewrite_header(data, header_end, lambda h: h[name].update(
            data_offsets=[0, h[name]["data_offsets"][1] - h[name]["data_offsets"][0]])),
        "shape bigger than its bytes": lambda: _rewrite_header(data, header_end, lambda h: h[name].update(
            shape=[HIDDEN, INTER * 2])),
        "header length past the file": lambda: struct.pack("<Q", len(data)) + data[8:],
        "header length 2^63": lambda: struct.pack("<Q", 2**63) + data[8:],
        "header not JSON": lambda: data[:8] + b"[" * (header_end - 8) + data[header_end:],
        "unknown dtype": lambda: _rewrite_header(data, header_end, lambda h: h[name].update(dtype="Q4_K")),
        "negative dimension": lambda: _rewrite_header(data, header_end, lambda h: h[name].update(shape=[-1, INTER])),
    }
    (folder / "model.safetensors").write_bytes(edits[lie]())
    tracemalloc.start()
    with own_cpu_seconds() as cpu:
        refused(ModelFormatError, r"not a valid safetensors file", folder, str(folder / "model.safetensors"))
    seconds = cpu.seconds
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 0.1 and peak < 1 << 20


def test_random_header_byte_flips(valid_file):
    """Seeded single-byte changes inside the JSON header: a clean load or our error."""
    folder, data, header_end = valid_file
    path = folder / "model.safetensors"
    rng = random.Random(6)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        buf = bytearray(data)
        buf[rng.randrange(8, header_end)] = rng.randrange(256)
        path.write_bytes(buf)
        try:
            load_safetensors_folder(folder)
            outcomes["loaded"] += 1
        except OURS:
            outcomes["refused"] += 1
    print(f"\nheader byte flips: {outcomes}")
    assert outcomes["refused"] > 0


def _drop(tensors: dict, *names: str) -> dict:
    return {k: v for k, v in tensors.items() if k not in names}


def test_wrong_shape_names_tensor_got_and_expected(tmp_path):
    tensors = hf_tensors(hf_config())
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(KV * 8 + 1, HIDDEN)
    folder = write_folder(tmp_path, hf_config(), tensors)
    refused(ModelFormatError, r"tensor model.layers.1.self_attn.k_proj.weight has shape \(17, 32\), but the "
                              r"config implies \(16, 32\)", folder, str(folder / "model.safetensors"))


def test_norm_stored_as_matrix(tmp_path):
    tensors = hf_tensors(hf_config())
    tensors["model.norm.weight"] = tensors["model.norm.weight"][None, :]
    refused(ModelFormatError, r"tensor model.norm.weight has shape \(1, 32\), but the config implies \(32,\)",
            write_folder(tmp_path, hf_config(), tensors))


def test_config_disagrees_with_every_shape(tmp_path):
    """intermediate_size off by one: the first tensor that shows it is named."""
    folder = write_folder(tmp_path, hf_config(intermediate_size=INTER + 1), hf_tensors(hf_config()))
    refused(ModelFormatError, r"mlp.gate_proj.weight has shape \(48, 32\), but the config implies \(49, 32\)", folder)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight",
                                  "model.norm.weight", "model.layers.0.input_layernorm.weight"])
def test_missing_tensor(name, tmp_path):
    folder = write_folder(tmp_path, hf_config(), _drop(hf_tensors(hf_config()), name))
    refused(ModelFormatError, rf"tensor {re.escape(name)} is missing", folder)


def test_untied_model_without_lm_head(tmp_path):
    cfg = hf_config(tie_word_embeddings=False)
    folder = write_folder(tmp_path, cfg, _drop(hf_tensors(cfg), "lm_head.weight"))
    refused(ModelFormatError, r"lm_head.weight is missing and .*config.json has tie_word_embeddings false", folder)


def test_tied_model_ignores_a_stored_lm_head(tmp_path):
    """transformers ties lm_head to the embedding when tie_word_embeddings is true, whatever is stored."""
    tensors = hf_tensors(hf_config())
    tensors["lm_head.weight"] = torch.zeros(VOCAB, HIDDEN)
    _, weights = load_safetensors_folder(write_folder(tmp_path, hf_config(), tensors))
    assert weights.lm_head is weights.embed


def test_untied_model_uses_its_lm_head(tmp_path):
    cfg = hf_config(tie_word_embeddings=False)
    tensors = hf_tensors(cfg)
    _, weights = load_safetensors_folder(write_folder(tmp_path, cfg, tensors))
    assert torch.equal(weights.lm_head.dequantize(), tensors["lm_head.weight"])


@pytest.mark.parametrize("name,dtype,shown", [
    ("model.embed_tokens.weight", torch.int32, "I32"),
    ("model.layers.0.self_attn.q_proj.weight", torch.int8, "I8"),
    ("model.norm.weight", torch.int64, "I64"),
    ("model.layers.1.mlp.up_proj.weight", torch.bool, "BOOL"),
    ("model.layers.1.mlp.up_proj.weight", torch.float64, "F64"),
])
def test_unsupported_dtype(name, dtype, shown, tmp_path):
    tensors = hf_tensors(hf_config())
    tensors[name] = tensors[name].to(dtype)
    refused(UnsupportedModelError, rf"tensor {re.escape(name)} has dtype {shown}; expected one of F32, F16, BF16",
            write_folder(tmp_path, hf_config(), tensors))


def test_half_precision_tensors_load(tmp_path):
    tensors = {k: v.to(torch.bfloat16 if "mlp" in k else torch.float16) for k, v in hf_tensors(hf_config()).items()}
    _, weights = load_safetensors_folder(write_folder(tmp_path, hf_config(), tensors))
    down = tensors["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(weights.layers[0].down.dequantize(torch.bfloat16), down)


@pytest.mark.parametrize("extra,error,pattern", [
    ("model.layers.0.self_attn.q_proj.bias", UnsupportedModelError, r"not supported \(no bias terms"),
    ("model.layers.2.mlp.up_proj.weight", ModelFormatError, r"belongs to layer 2, but the config has 2 layers"),
    ("model.layers.7.input_layernorm.weight", ModelFormatError, r"belongs to layer 7"),
    ("score.weight", ModelFormatError, r"unexpected tensor score.weight"),
])
def test_unexpected_tensor(extra, error, pattern, tmp_path):
    tensors = dict(hf_tensors(hf_config()), **{extra: torch.zeros(4)})
    refused(error, pattern, write_folder(tmp_path, hf_config(), tensors), extra)


def test_saved_rotary_buffer_is_harmless(tmp_path):
    tensors = dict(hf_tensors(hf_config()), **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)})
    load_safetensors_folder(write_folder(tmp_path, hf_config(), tensors))


# --- sharded models

def _two_shards(tensors: dict) -> list[list[str]]:
    names = list(tensors)
    return [names[: len(names) // 2], names[len(names) // 2:]]


def test_sharded_model_equals_single_file(tmp_path):
    cfg = hf_config(tie_word_embeddings=False)
    tensors = hf_tensors(cfg)
    one = load_safetensors_folder(write_folder(tmp_path / "one", cfg, tensors))
    two = load_safetensors_folder(write_folder(tmp_path / "two", cfg, tensors, shards=_two_shards(tensors)))
    assert one[0] == two[0]
    for a, b in [(one[1].embed, two[1].embed), (one[1].lm_head, two[1].lm_head),
                 (one[1].layers[1].gate_up, two[1].layers[1].gate_up)]:
        assert torch.equal(a.dequantize(), b.dequantize())


def test_shards_without_index_load(tmp_path):
    tensors = hf_tensors(hf_config())
    folder = write_folder(tmp_path, hf_config(), tensors, shards=_two_shards(tensors))
    (folder / "model.safetensors.index.json").unlink()
    load_safetensors_folder(folder)


def test_index_names_a_missing_file(tmp_path):
    tensors = hf_tensors(hf_config())
    folder = write_folder(tmp_path, hf_config(), tensors, shards=_two_shards(tensors))
    (folder / "model-00002-of-00002.safetensors").unlink()
    refused(ModelFormatError, r"names model-00002-of-00002.safetensors, which is not in", folder,
            "model.safetensors.index.json")


@pytest.mark.parametrize("file", ["../model-00001-of-00002.safetensors", "/etc/passwd", "", 7, None])
def test_index_file_name_outside_folder(file, tmp_path):
    tensors = hf_tensors(hf_config())
    shards = _two_shards(tensors)
    weight_map = {n: "model-00001-of-00002.safetensors" for n in shards[0]}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in shards[1]})
    weight_map["model.norm.weight"] = file
    folder = write_folder(tmp_path, hf_config(), tensors, shards=shards, index={"weight_map": weight_map})
    refused(ModelFormatError, r"weight_map\['model.norm.weight'\] = .* is not a file name", folder)


def test_duplicate_tensor_across_shards(tmp_path):
    tensors = hf_tensors(hf_config())
    shards = _two_shards(tensors)
    shards[1].append(shards[0][0])
    folder = write_folder(tmp_path, hf_config(), tensors, shards=shards)
    (folder / "model.safetensors.index.json").unlink()
    refused(ModelFormatError, rf"tensor {re.escape(shards[0][0])} is also in model-00001-of-00002.safetensors",
            folder, "model-00002-of-00002.safetensors")


def test_duplicate_tensor_with_index(tmp_path):
    tensors = hf_tensors(hf_config())
    shards = _two_shards(tensors)
    shards[1].append(shards[0][0])
    refused(ModelFormatError, r"is also in", write_folder(tmp_path, hf_config(), tensors, shards=shards))


@pytest.mark.parametrize("lie", ["wrong file", "tensor nowhere", "tensor not listed"])
def test_index_contradicts_files(lie, tmp_path):
    tensors = hf_tensors(hf_config())
    shards = _two_shards(tensors)
    weight_map = {n: f"model-0000{k + 1}-of-00002.safetensors" for k, names in enumerate(shards) for n in names}
    moved = shards[0][1]
    if lie == "wrong file":
        weight_map[moved] = "model-00002-of-00002.safetensors"
        pattern = rf"lists tensor {re.escape(moved)} in model-00002-of-00002.safetensors, but it is in model-00001"
    elif lie == "tensor nowhere":
        weight_map["model.layers.0.mlp.ghost.weight"] = "model-00001-of-00002.safetensors"
        pattern = r"lists tensor model.layers.0.mlp.ghost.weight in .*, but no listed file holds it"
    else:
        del weight_map[moved]
        pattern = rf"tensor {re.escape(moved)} is not listed in .*model.safetensors.index.json"
    folder = write_folder(tmp_path, hf_config(), tensors, shards=shards, index={"weight_map": weight_map})
    refused(ModelFormatError, pattern, folder)


@pytest.mark.parametrize("index,pattern", [
    (b"{not json", r"not valid JSON"),
    ({"metadata": {}}, r"weight_map must be a non-empty object"),
    ({"weight_map": []}, r"weight_map must be a non-empty object"),
    ({"weight_map": {}}, r"weight_map must be a non-empty object"),
])
def test_index_malformed(index, pattern, tmp_path):
    tensors = hf_tensors(hf_config())
    folder = write_folder(tmp_path, hf_config(), tensors, shards=_two_shards(tensors), index=index)
    refused(ModelFormatError, pattern, folder, "model.safetensors.index.json")


def test_terabyte_config_refused_without_allocating(tmp_path):
    """Sizes that would need terabytes are refused on the header shapes, before any data is read."""
    folder = write_folder(tmp_path, hf_config(hidden_size=2**40, intermediate_size=2**41, vocab_size=2**30),
                          hf_tensors(hf_config()))
    tracemalloc.start()
    refused(ModelFormatError, r"has shape .* but the config implies", folder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20


# ---------------------------------------------------------------- GGUF semantics
# Files written by gguf-py's GGUFWriter: a tiny model, then one change per case.

def gguf_kv(arch: str = "smollm3") -> dict[str, tuple]:
    tokens = [f"t{i}" for i in range(VOCAB)]
    return {
        f"{arch}.block_count": (LAYERS, VT.UINT32), f"{arch}.context_length": (128, VT.UINT32),
        f"{arch}.embedding_length": (HIDDEN, VT.UINT32), f"{arch}.feed_forward_length": (INTER, VT.UINT32),
        f"{arch}.attention.head_count": (HEADS, VT.UINT32), f"{arch}.attention.head_count_kv": (KV, VT.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
        f"{arch}.rope.freq_base": (5e6, VT.FLOAT32), f"{arch}.vocab_size": (VOCAB, VT.UINT32),
        "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.bos_token_id": (1, VT.UINT32), "tokenizer.ggml.eos_token_id": (2, VT.UINT32),
        "tokenizer.ggml.padding_token_id": (2, VT.UINT32),
    }


def gguf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF names, numpy shape [rows, cols] (gguf-py writes ne reversed)."""
    rng = np.random.default_rng(seed)
    hd = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * hd, HIDDEN), f"blk.{i}.attn_k.weight": (KV * hd, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV * hd, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * hd),
            f"blk.{i}.ffn_gate.weight": (INTER, HIDDEN), f"blk.{i}.ffn_up.weight": (INTER, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, INTER),
        })
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_gguf(path: Path, kv: dict, tensors: dict, arch: str = "smollm3") -> Path:
    w = GGUFWriter(str(path), arch)
    for key, (value, vtype, *sub) in kv.items():
        w.add_key_value(key, value, vtype, sub[0] if sub else None)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_refused(path: Path, error, pattern: str, *names: str) -> str:
    with own_cpu_seconds() as cpu, pytest.raises(OURS) as info, GGUFFile(path) as f:
        load_gguf(f)
    msg = str(info.value)
    assert type(info.value) is error, msg
    assert re.search(pattern, msg), (pattern, msg)
    for name in (str(path), *names):
        assert name in msg, (name, msg)
    assert cpu.seconds < 0.5
    return msg


def test_gguf_tiny_model_loads(tmp_path):
    tensors = gguf_tensors()
    with GGUFFile(write_gguf(tmp_path / "ok.gguf", gguf_kv(), tensors)) as f:
        config, weights = load_gguf(f)
    assert (config.arch, config.vocab_size, config.hidden_size, config.n_layers, config.n_heads, config.n_kv_heads,
            config.intermediate_size, config.tie_word_embeddings) == ("smollm3", VOCAB, HIDDEN, LAYERS, HEADS, KV,
                                                                      INTER, True)
    assert np.array_equal(weights.layers[1].down.dequantize().numpy(), tensors["blk.1.ffn_down.weight"])
    assert np.array_equal(weights.norm.numpy(), tensors["output_norm.weight"])


A = "smollm3"
GGUF_CASES = {
    "block_count as string": ({f"{A}.block_count": ("2", VT.STRING)}, F,
                              rf"metadata key {A}.block_count must be an integer, got '2'"),
    "block_count as float": ({f"{A}.block_count": (2.0, VT.FLOAT32)}, F, r"block_count must be an integer, got 2.0"),
    "block_count as bool": ({f"{A}.block_count": (True, VT.BOOL)}, F, r"block_count must be an integer, got True"),
    "block_count as array": ({f"{A}.block_count": ([2, 2], VT.ARRAY, VT.UINT32)}, F,
                             r"block_count must be an integer, got \[2, 2\]"),
    "block_count huge": ({f"{A}.block_count": (2**32 - 1, VT.UINT32)}, F,
                         rf"block_count must be in 1..{MAX_LAYERS}, got 4294967295"),
    "block_count zero": ({f"{A}.block_count": (0, VT.UINT32)}, F, rf"block_count must be in 1..{MAX_LAYERS}, got 0"),
    "block_count missing": ({f"{A}.block_count": None}, F, rf"metadata key {A}.block_count is missing"),
    "negative embedding_length": ({f"{A}.embedding_length": (-32, VT.INT32)}, F,
                                  r"embedding_length must be >= 1, got -32"),
    "head_count_kv does not divide": ({f"{A}.attention.head_count_kv": (3, VT.UINT32)}, F,
                                      rf"attention.head_count \(4\) is not a multiple of {A}.attention.head_count_kv "
                                      r"\(3\)"),
    "head_count zero": ({f"{A}.attention.head_count": (0, VT.UINT32)}, F, r"head_count must be >= 1, got 0"),
    "embedding not divisible": ({f"{A}.embedding_length": (30, VT.UINT32)}, F,
                                r"embedding_length \(30\) is not divisible by .*head_count \(4\) and there is no "
                                rf"{A}.attention.key_length"),
    "rms eps missing": ({f"{A}.attention.layer_norm_rms_epsilon": None}, F, r"layer_norm_rms_epsilon is missing"),
    "rms eps as string": ({f"{A}.attention.layer_norm_rms_epsilon": ("1e-5", VT.STRING)}, F,
                          r"layer_norm_rms_epsilon must be a finite number, got '1e-5'"),
    "rms eps NaN": ({f"{A}.attention.layer_norm_rms_epsilon": (float("nan"), VT.FLOAT32)}, F,
                    r"must be a finite number, got nan"),
    "rope base negative": ({f"{A}.rope.freq_base": (-1.0, VT.FLOAT32)}, F, r"rope.freq_base must be > 0"),
    "value length differs": ({f"{A}.attention.key_length": (8, VT.UINT32),
                              f"{A}.attention.value_length": (16, VT.UINT32)}, U, r"value_length 16 differs"),
    "partial rope": ({f"{A}.rope.dimension_count": (4, VT.UINT32)}, U, r"partial RoPE is not supported"),
    "rope scaling longrope": ({f"{A}.rope.scaling.type": ("longrope", VT.STRING)}, U,
                              r"rope.scaling.type 'longrope' is not supported"),
    "mixture of experts": ({f"{A}.expert_count": (8, VT.UINT32)}, U, r"mixture-of-experts"),
    "no vocab anywhere": ({f"{A}.vocab_size": None, "tokenizer.ggml.tokens": None}, F,
                          r"vocab_size is missing and there is no tokenizer.ggml.tokens"),
    "bos id at vocab size": ({"tokenizer.ggml.bos_token_id": (VOCAB, VT.UINT32)}, F,
                             rf"tokenizer.ggml.bos_token_id = {VOCAB} is outside the vocabulary of {VOCAB} tokens"),
    "eos id huge": ({"tokenizer.ggml.eos_token_id": (2**32 - 1, VT.UINT32)}, F,
                    r"tokenizer.ggml.eos_token_id = 4294967295 is outside"),
    "pad id negative": ({"tokenizer.ggml.padding_token_id": (-1, VT.INT32)}, F,
                        r"tokenizer.ggml.padding_token_id = -1 is outside"),
    "unk id past the token list": ({f"{A}.vocab_size": (VOCAB + 8, VT.UINT32),
                                    "tokenizer.ggml.unknown_token_id": (VOCAB + 1, VT.UINT32)}, F,
                                   rf"unknown_token_id = {VOCAB + 1} is outside the vocabulary of {VOCAB} tokens"),
    "eos id as string": ({"tokenizer.ggml.eos_token_id": ("2", VT.STRING)}, F,
                         r"tokenizer.ggml.eos_token_id must be an integer token id, got '2'"),
    "more tokens than embeddings": ({f"{A}.vocab_size": (VOCAB - 1, VT.UINT32)}, F,
                                    rf"tokenizer.ggml.tokens has {VOCAB} tokens but the model has only {VOCAB - 1}"),
    "tokens not an array": ({"tokenizer.ggml.tokens": ("t0 t1", VT.STRING)}, F,
                            r"tokenizer.ggml.tokens must be an array of strings"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_metadata_refused(case, tmp_path):
    changes, error, pattern = GGUF_CASES[case]
    kv = gguf_kv()
    for key, value in changes.items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = value
    gguf_refused(write_gguf(tmp_path / "bad.gguf", kv, gguf_tensors()), error, pattern)


def test_every_gguf_key_with_hostile_values():
    """Each metadata key set to each hostile value (as GGUFFile would hand it over): a ModelConfig or our error."""
    base = dict({k: v[0] for k, v in gguf_kv().items()}, **{"general.architecture": A})
    accepted = refused_count = 0
    for key in base:
        for value in HOSTILE_VALUES:
            try:
                ModelConfig.from_gguf_metadata(dict(base, **{key: value}), "x.gguf")
                accepted += 1
            except OURS as e:
                assert "x.gguf" in str(e)
                refused_count += 1
    print(f"\nGGUF metadata sweep: {len(base)} keys x {len(HOSTILE_VALUES)} values: {refused_count} refused, "
          f"{accepted} accepted")
    assert refused_count > 100


def test_gguf_unknown_architecture(tmp_path):
    gguf_refused(write_gguf(tmp_path / "q.gguf", gguf_kv("qwen2"), gguf_tensors(), arch="qwen2"),
                 UnsupportedModelError, r"architecture 'qwen2' is not supported")


@pytest.mark.parametrize("change,error,pattern", [
    ("wrong shape", F, r"tensor blk.0.attn_q.weight has shape \(32, 31\), but the config implies \(32, 32\)"),
    ("missing", F, r"tensor blk.1.ffn_down.weight is missing"),
    ("extra layer", F, r"tensor blk.2.attn_norm.weight belongs to layer 2, but the config has 2 layers"),
    ("bias", U, r"tensor blk.0.attn_q.bias is not supported"),
    ("rope factors", U, r"tensor rope_freqs.weight is not supported"),
    ("stranger", F, r"unexpected tensor foo.weight"),
    ("norm as matrix", F, r"tensor output_norm.weight has shape \(1, 32\), but the config implies \(32,\)"),
    ("untied head wrong shape", F, rf"tensor output.weight has shape \({VOCAB - 1}, 32\), but the config implies "
                                   rf"\({VOCAB}, 32\)"),
])
def test_gguf_tensors_against_config(change, error, pattern, tmp_path):
    t = gguf_tensors()
    z = np.zeros(HIDDEN, np.float32)
    if change == "wrong shape":
        t["blk.0.attn_q.weight"] = np.zeros((HIDDEN, HIDDEN - 1), np.float32)
    elif change == "missing":
        del t["blk.1.ffn_down.weight"]
    elif change == "extra layer":
        t["blk.2.attn_norm.weight"] = z
    elif change == "bias":
        t["blk.0.attn_q.bias"] = z
    elif change == "rope factors":
        t["rope_freqs.weight"] = z[:4]
    elif change == "stranger":
        t["foo.weight"] = z
    elif change == "norm as matrix":
        t["output_norm.weight"] = z[None, :]
    else:
        t["output.weight"] = np.zeros((VOCAB - 1, HIDDEN), np.float32)
    gguf_refused(write_gguf(tmp_path / "bad.gguf", gguf_kv(), t), error, pattern)


def test_gguf_terabyte_sizes_refused_without_allocating(tmp_path):
    """Declared sizes of terabytes against a tiny file: refused on shapes, nothing allocated."""
    kv = gguf_kv()
    kv.update({f"{A}.embedding_length": (2**40, VT.UINT64), f"{A}.attention.head_count": (2**30, VT.UINT32),
               f"{A}.attention.head_count_kv": (2**30, VT.UINT32), f"{A}.vocab_size": (2**31, VT.UINT32),
               f"{A}.feed_forward_length": (2**40, VT.UINT64)})
    path = write_gguf(tmp_path / "big.gguf", kv, gguf_tensors())
    tracemalloc.start()
    gguf_refused(path, F, r"has shape .* but the config implies")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20


def test_runtime_load_surfaces_the_refusal(tmp_path):
    kv = dict(gguf_kv(), **{"tokenizer.ggml.bos_token_id": (VOCAB + 5, VT.UINT32)})
    path = write_gguf(tmp_path / "bad.gguf", kv, gguf_tensors())
    with pytest.raises(ModelFormatError, match=rf"{re.escape(str(path))}: .*bos_token_id = {VOCAB + 5} is outside"):
        Runtime.load(path, device="cpu", backend="torch")


def test_real_smollm2_gguf_passes_the_semantic_checks(smollm2_path):
    """No false refusal on a file llama.cpp's converter made: every tensor, id and key accepted."""
    with GGUFFile(smollm2_path) as f:
        config, names = check_gguf(f)
        ids = {k: v for k, v in f.metadata.items() if k.endswith("_token_id")}
        assert len(f.tensors) == 1 + 1 + 9 * config.n_layers  # embedding, final norm, 9 per layer; tied head
    assert (config.arch, config.vocab_size, config.n_layers, config.hidden_size) == ("llama", 49152, 30, 576)
    assert names["lm_head"] is None and config.tie_word_embeddings
    assert ids and all(0 <= v < config.vocab_size for v in ids.values())
    assert math.isclose(config.rope_theta, 100000.0)
