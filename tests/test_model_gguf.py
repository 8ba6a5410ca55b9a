"""Our runtime on GGUF files written the way llama.cpp writes them (permuted Q/K,
its tensor names and keys), in F32, F16, Q8_0 and Q4_K_M (real llama.cpp
quantization: Q4_K + Q6_K, with fallbacks where rows are not multiples of 256).

Two oracles, neither using our loader:
- transformers run on the same weights dequantized by gguf-py (gguf_reference_model):
  max |ours - ref| / max |ref| <= 1e-4, both fp32 on identical weights;
- llama.cpp itself loading the very file: it quantizes activations to 8 bits for
  quantized matmuls, so agreement is measured as KL divergence, reported per file.
"""
import numpy as np
import pytest

from smollm3_triton import Runtime
from tests.helpers.gguf_export import (
    export_gguf,
    gguf_reference_model,
    hf_logits,
    kl_divergence,
    llama_cpp_logits,
    random_hf_model,
    tensor_types,
)

CASES = [
    ("smollm3", "f32", {}),
    ("smollm3", "f16", {}),
    ("smollm3", "q8_0", dict(num_attention_heads=4, num_key_value_heads=1)),
    ("smollm3", "q4_k_m", dict(tie_word_embeddings=False)),
    ("llama", "q8_0", dict(hidden_size=192, head_dim=64, num_attention_heads=3, num_key_value_heads=1)),
    ("llama", "q4_k_m", dict(num_attention_heads=8, num_key_value_heads=8, head_dim=32)),
]
IDS = [f"{k}-{f}" for k, f, _ in CASES]
TOKENS = list(np.random.default_rng(0).integers(0, 49152, size=48))

# KL(llama.cpp || ours) per token, mean over the sequence. llama.cpp's own
# arithmetic sets the floor: an f16 KV cache (~1e-6 measured on F32 files) and,
# for quantized weights, activations quantized to 8 bits before the dot
# (~1e-3 measured on Q8_0, ~2.5e-3 on Q4_K_M). Top-1 agreement is printed only:
# these random models have near-flat logits, so ties flip; the real model's
# top-1 agreement is asserted in test_real_smollm2.py.
MAX_MEAN_KL = {"f32": 1e-5, "f16": 1e-4, "q8_0": 5e-3, "q4_k_m": 1e-2}


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def gguf_case(request, tmp_path_factory):
    kind, ftype, overrides = request.param
    if ftype == "q4_k_m":
        pytest.importorskip("llama_cpp")
    path = tmp_path_factory.mktemp("gguf") / f"{kind}-{ftype}.gguf"
    export_gguf(random_hf_model(kind, seed=3, **overrides), path, ftype)
    ours = Runtime.load(path, device="cpu", backend="torch", max_seq_len=64).logits(TOKENS).numpy()
    return ftype, path, ours


def test_logits_match_transformers_on_dequantized_weights(gguf_case):
    ftype, path, ours = gguf_case
    ref = hf_logits(gguf_reference_model(path), TOKENS)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    types = sorted(set(tensor_types(path).values()))
    print(f"{path.name}: types {types}, max rel error vs transformers {err:.2e}")
    if ftype == "q4_k_m":
        assert {"Q4_K", "Q6_K"} <= set(types)
    assert err <= 1e-4


def test_llama_cpp_agrees(gguf_case):
    pytest.importorskip("llama_cpp")
    ftype, path, ours = gguf_case
    theirs = llama_cpp_logits(path, TOKENS)
    kl = kl_divergence(theirs, ours)
    top1 = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    print(f"{path.name}: KL(llama.cpp || ours) mean {kl.mean():.2e} max {kl.max():.2e}, top-1 agreement {top1:.3f}")
    assert kl.mean() <= MAX_MEAN_KL[ftype]
