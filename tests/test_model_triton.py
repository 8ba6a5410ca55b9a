"""The whole model on the Triton kernels (CPU: TRITON_INTERPRET=1) against the torch
reference path, on small random SmolLM3 and SmolLM2 models from safetensors and from
GGUF (Q8_0, and Q4_K_M as llama.cpp quantizes it: Q4_K + Q6_K).

Vocabularies are cut to 512 tokens so the interpreter's LM head stays cheap; the GGUF
files then carry the first 512 SmolLM2 tokens (no merges), which the model does not read.
fp32 on both sides; tolerance 1e-4 of the largest logit: the kernels accumulate in
fp32 in a different order and use online softmax.
"""
import pytest
import torch

from smollm3_triton.backends import TORCH_OPS, triton_ops
from smollm3_triton.gguf.reader import GGUFFile
from smollm3_triton.model import Batch, Transformer
from smollm3_triton.weights import load_gguf, load_safetensors_folder
from tests.helpers import gguf_export
from tests.helpers.gguf_export import export_gguf, random_hf_model, save_hf_folder

VOCAB = 512
SMALL = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
MODELS = {
    "smollm3": dict(kind="smollm3", num_attention_heads=4, num_key_value_heads=1, **SMALL),
    "smollm2": dict(kind="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=64, **SMALL),
}


@pytest.fixture
def small_vocab_tokenizer(monkeypatch):
    full = gguf_export.smollm2_tokenizer()
    cut = dict(full)
    cut["tokenizer.ggml.tokens"] = full["tokenizer.ggml.tokens"][:VOCAB]
    cut["tokenizer.ggml.token_type"] = full["tokenizer.ggml.token_type"][:VOCAB]
    cut["tokenizer.ggml.merges"] = []
    monkeypatch.setattr(gguf_export, "smollm2_tokenizer", lambda: cut)


BLOCK = 4
# One sequence's blocks, deliberately out of order: the slot of position p is
# TABLE[p // BLOCK] * BLOCK + p % BLOCK.
TABLE = [3, 0, 5]


def one_sequence_batch(ids: torch.Tensor, start: int, all_logits: bool) -> Batch:
    """The step computing ids at positions start.. of a single sequence (what the engine
    builds for one request): positions arange, one block table, slots through it."""
    n = ids.numel()
    positions = torch.arange(start, start + n)
    table = torch.tensor(TABLE, dtype=torch.int32)
    slots = table[positions // BLOCK].long() * BLOCK + positions % BLOCK
    return Batch(token_ids=ids, positions=positions, slot_mapping=slots,
                 query_start=torch.tensor([0, n], dtype=torch.int32),
                 seq_lens=torch.tensor([start + n], dtype=torch.int32), block_tables=table[None],
                 max_query_len=n, logits_rows=torch.arange(n) if all_logits else torch.tensor([n - 1]))


def run_both(config, weights):
    """Prefill 7 tokens then decode 2, on each op set; returns stacked logits of both."""
    outs = []
    for backend in ("torch", "triton"):
        model = Transformer(config, weights, TORCH_OPS if backend == "torch" else triton_ops(), max_seq_len=16, dtype=torch.float32,
                            device=torch.device("cpu"))
        model.allocate_cache(n_blocks=6, block_size=BLOCK)
        ids = torch.tensor([3, 141, 59, 26, 500, 8, 77, 200, 311])
        logits = [model.forward(one_sequence_batch(ids[:7], 0, all_logits=True))]
        logits += [model.forward(one_sequence_batch(ids[p:p + 1], p, all_logits=False)) for p in (7, 8)]
        outs.append(torch.cat(logits))
    return outs


def check(name, ours, ref):
    err = float((ours - ref).abs().max() / ref.abs().max())
    print(f"{name}: triton vs torch max rel error {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_safetensors(name, tmp_path):
    case = dict(MODELS[name])
    hf = random_hf_model(case.pop("kind"), seed=7, **case)
    config, weights = load_safetensors_folder(save_hf_folder(hf, tmp_path))
    ref, ours = run_both(config, weights)
    check(f"{name} safetensors", ours, ref)


@pytest.mark.parametrize("ftype", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("name", MODELS)
def test_gguf(name, ftype, tmp_path, small_vocab_tokenizer):
    if ftype == "q4_k_m":
        pytest.importorskip("llama_cpp")
    case = dict(MODELS[name])
    path = export_gguf(random_hf_model(case.pop("kind"), seed=8, **case), tmp_path / "m.gguf", ftype)
    config, weights = load_gguf(GGUFFile(path))
    ref, ours = run_both(config, weights)
    check(f"{name} {ftype}", ours, ref)
