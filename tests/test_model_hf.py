"""Our model from safetensors against transformers (fp32) on small random configs.

The configs cover what the runtime must get right: an irregular no_rope_layers
list, GQA groups of 1, 3 and 4, head_dim 64 and 128, tied and untied heads, a
hidden size that is not a multiple of 256, and YaRN scaling past the original
context. Tolerance: max |ours - ref| / max |ref| <= 1e-4 (both fp32; the only
differences are summation order and our float64 RoPE angles).
"""
import pytest
import torch

from smollm3_triton.backends import TORCH_OPS
from smollm3_triton.model import Batch, Transformer
from smollm3_triton.weights import load_safetensors_folder
from tests.helpers.gguf_export import random_hf_model, save_hf_folder

CASES = {
    "smollm3-irregular-nope-gqa3-untied-h192": dict(
        kind="smollm3", hidden_size=192, intermediate_size=320, num_hidden_layers=5, num_attention_heads=3,
        num_key_value_heads=1, no_rope_layers=[1, 0, 1, 1, 0], tie_word_embeddings=False),
    "smollm3-gqa1-hd128-tied": dict(
        kind="smollm3", hidden_size=256, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, no_rope_layers=[0, 1, 1], tie_word_embeddings=True),
    "llama-gqa4-hd64-tied": dict(
        kind="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
    "llama-gqa3-untied-h576": dict(
        kind="llama", hidden_size=576, intermediate_size=256, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=False),
    "smollm3-yarn": dict(
        kind="smollm3", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64}),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, tmp_path):
    case = dict(CASES[name])
    hf = random_hf_model(case.pop("kind"), seed=1, **case)
    config, weights = load_safetensors_folder(save_hf_folder(hf, tmp_path))
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    if hf.config.model_type == "smollm3":
        assert list(config.use_rope) == [bool(v) for v in hf.config.no_rope_layers]
    model = Transformer(config, weights, TORCH_OPS, max_seq_len=160, dtype=torch.float32,
                        device=torch.device("cpu"))
    model.allocate_cache(n_blocks=10, block_size=16)
    ids = torch.randint(0, config.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        ours = model.forward(Batch.from_sequences([ids], [9, 3, 5, 0, 1, 2, 4, 6, 7, 8], 16, "cpu"))
    err = rel_err(ours, ref)
    print(f"{name}: max rel error {err:.2e}")
    assert err <= 1e-4


def test_decode_matches_full_forward(tmp_path):
    """Prefill a prefix, then feed tokens one at a time through the KV cache: each
    step's logits equal the full forward's row for that position."""
    hf = random_hf_model("smollm3", seed=2, num_hidden_layers=4, no_rope_layers=[1, 1, 0, 1],
                         num_attention_heads=4, num_key_value_heads=1)
    config, weights = load_safetensors_folder(save_hf_folder(hf, tmp_path))
    model = Transformer(config, weights, TORCH_OPS, max_seq_len=64, dtype=torch.float32,
                        device=torch.device("cpu"))
    model.allocate_cache(n_blocks=8, block_size=8)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    blocks = [6, 2, 7, 0, 3]

    def decode(p: int) -> Batch:        # token p of the sequence, its context 0..p in `blocks`
        return Batch(token_ids=ids[p:p + 1], positions=torch.tensor([p]),
                     slot_mapping=torch.tensor([blocks[p // 8] * 8 + p % 8]),
                     query_start=torch.tensor([0, 1], dtype=torch.int32),
                     seq_lens=torch.tensor([p + 1], dtype=torch.int32),
                     block_tables=torch.tensor([blocks], dtype=torch.int32), max_query_len=1,
                     logits_rows=torch.tensor([0]))
    with torch.no_grad():
        full = model.forward(Batch.from_sequences([ids], blocks, 8, "cpu"))
        model.cache.k.zero_(), model.cache.v.zero_()
        prefill = Batch.from_sequences([ids[:25]], blocks, 8, "cpu")
        prefill.logits_rows = prefill.logits_rows[-1:]
        steps = [model.forward(prefill)]
        steps += [model.forward(decode(p)) for p in range(25, 40)]
    stepwise = torch.cat(steps)
    err = rel_err(stepwise, full[24:])
    print(f"decode vs full forward: max rel error {err:.2e}")
    assert err <= 1e-5
