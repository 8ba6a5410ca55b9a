"""Model weights from a GGUF file or a Hugging Face safetensors folder, in one layout.

Internal layout (the model and the kernels see only this):
- Q and K rows in the half-split RoPE order of HF checkpoints. GGUF stores them
  interleaved per head (llama.cpp's convert permutes them); we reorder whole rows
  back at load, which moves quantized blocks without requantizing.
- q, k, v fused into one matrix and gate, up into another, once at load.
- The LM head is the embedding table itself when the file has no separate one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ModelFormatError, UnsupportedModelError
from .quant import SUPPORTED_TYPES, GGMLType, QuantTensor, Weight, concat_rows, type_name


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Weight
    o: Weight
    ffn_norm: torch.Tensor
    gate_up: Weight
    down: Weight


@dataclass
class ModelWeights:
    embed: QuantTensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: QuantTensor

    def map(self, fn, fn_norm) -> ModelWeights:
        """A copy with every matrix passed through fn and every norm vector through fn_norm."""
        lm_head = fn(self.lm_head) if self.lm_head is not self.embed else None
        embed = fn(self.embed)
        return ModelWeights(
            embed=embed,
            layers=[LayerWeights(fn_norm(l.attn_norm), fn(l.qkv), fn(l.o), fn_norm(l.ffn_norm), fn(l.gate_up), fn(l.down))
                    for l in self.layers],
            norm=fn_norm(self.norm),
            lm_head=embed if lm_head is None else lm_head)


def gguf_rope_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns GGUF's interleaved Q/K rows back into half-split ones.

    llama.cpp's converter writes HF row (h, t, i) (head h, half t, index i < d/2)
    at GGUF row h*d + 2*i + t.
    """
    h = torch.arange(n_heads)[:, None, None]
    t = torch.arange(2)[None, :, None]
    i = torch.arange(head_dim // 2)[None, None, :]
    return (h * head_dim + 2 * i + t).reshape(-1)


def _check_shape(name: str, got: tuple, expected: tuple, source: str) -> None:
    if tuple(got) != tuple(expected):
        raise ModelFormatError(f"{source}: tensor {name} has shape {tuple(got)}, but the config implies {tuple(expected)}")


def _expected_shapes(c: ModelConfig) -> dict[str, tuple]:
    return {
        "attn_norm": (c.hidden_size,), "ffn_norm": (c.hidden_size,),
        "q": (c.n_heads * c.head_dim, c.hidden_size), "k": (c.n_kv_heads * c.head_dim, c.hidden_size),
        "v": (c.n_kv_heads * c.head_dim, c.hidden_size), "o": (c.hidden_size, c.n_heads * c.head_dim),
        "gate": (c.intermediate_size, c.hidden_size), "up": (c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
    }


def _assemble(config: ModelConfig, get_matrix, get_vector, names: dict[str, str], source: str,
              permute_qk: bool) -> ModelWeights:
    """Build ModelWeights from accessors by name; `names` maps our roles to the file's names ("{i}" = layer)."""
    shapes = _expected_shapes(config)

    def matrix(role: str, i: int | None = None, shape=None) -> QuantTensor:
        name = names[role].format(i=i)
        w = get_matrix(name)
        _check_shape(name, w.shape, shape or shapes[role], source)
        return w

    def vector(role: str, i: int | None = None) -> torch.Tensor:
        name = names[role].format(i=i)
        v = get_vector(name)
        _check_shape(name, tuple(v.shape), (config.hidden_size,), source)
        return v

    q_rows = gguf_rope_rows(config.n_heads, config.head_dim) if permute_qk else None
    k_rows = gguf_rope_rows(config.n_kv_heads, config.head_dim) if permute_qk else None
    layers = []
    for i in range(config.n_layers):
        q, k, v = matrix("q", i), matrix("k", i), matrix("v", i)
        if permute_qk:
            q, k = q.take_rows(q_rows), k.take_rows(k_rows)
        layers.append(LayerWeights(
            attn_norm=vector("attn_norm", i), qkv=concat_rows([q, k, v]), o=matrix("o", i),
            ffn_norm=vector("ffn_norm", i), gate_up=concat_rows([matrix("gate", i), matrix("up", i)]),
            down=matrix("down", i)))
    embed = matrix("embed", shape=(config.vocab_size, config.hidden_size))
    lm_head = embed if names.get("lm_head") is None else matrix("lm_head", shape=(config.vocab_size, config.hidden_size))
    return ModelWeights(embed=embed, layers=layers, norm=vector("norm"), lm_head=lm_head)


GGUF_NAMES = {
    "embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight", "ffn_norm": "blk.{i}.ffn_norm.weight",
    "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight", "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}

HF_NAMES = {
    "embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight", "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}


def load_gguf(gguf) -> tuple[ModelConfig, ModelWeights]:
    """Config and weights from an open GGUFFile (data stays memory-mapped until moved to a device)."""
    source = str(gguf.path)
    config = ModelConfig.from_gguf_metadata(gguf.metadata, source)
    names = dict(GGUF_NAMES)
    if names["lm_head"] not in gguf.tensors:
        names["lm_head"] = None
        config = _replace(config, tie_word_embeddings=True)

    def get(name: str) -> QuantTensor:
        info = gguf.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{source}: tensor {name} is missing")
        if info.qtype not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"{source}: tensor {name} has type {type_name(info.qtype)}, which is not supported")
        return gguf.quant_tensor(name)

    def get_vector(name: str) -> torch.Tensor:
        w = get(name)
        if not w.is_float:
            raise UnsupportedModelError(f"{source}: norm tensor {name} is {type_name(w.qtype)}; expected F32/F16/BF16")
        return w.data.reshape(-1).float()

    return config, _assemble(config, get, get_vector, names, source, permute_qk=True)


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    from dataclasses import replace
    return replace(config, **changes)


TORCH_TO_GGML = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}


def load_safetensors_folder(folder: Path) -> tuple[ModelConfig, ModelWeights]:
    """Config and weights from config.json + *.safetensors (sharded or not)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{folder}: config.json is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path}: expected a JSON object")
    config = ModelConfig.from_hf_config(cfg, str(cfg_path))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:  # the safetensors library validates header, offsets and sizes
            raise ModelFormatError(f"{f}: not a valid safetensors file ({e})") from None
    names = dict(HF_NAMES)
    if names["lm_head"] not in tensors:
        names["lm_head"] = None
        config = _replace(config, tie_word_embeddings=True)
    elif config.tie_word_embeddings:
        names["lm_head"] = None

    def get(name: str) -> QuantTensor:
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{folder}: tensor {name} is missing")
        if t.dtype not in TORCH_TO_GGML:
            raise UnsupportedModelError(f"{folder}: tensor {name} has dtype {t.dtype}; expected float32/float16/bfloat16")
        if t.dim() != 2:
            raise ModelFormatError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, expected a matrix")
        return QuantTensor(t, TORCH_TO_GGML[t.dtype], tuple(t.shape))

    def get_vector(name: str) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{folder}: tensor {name} is missing")
        return t.float()

    return config, _assemble(config, get, get_vector, names, str(folder), permute_qk=False)


def dequantize_weights(weights: ModelWeights, dtype: torch.dtype) -> ModelWeights:
    """Every matrix dequantized once into `dtype`: the CPU torch path's trade of memory
    for speed (dequantizing per token costs several times the matmul on a CPU)."""
    ggml_type = TORCH_TO_GGML[dtype]
    return weights.map(lambda w: QuantTensor(w.dequantize(dtype).contiguous(), ggml_type, w.shape), lambda v: v)


def to_device(weights: ModelWeights, device: torch.device) -> ModelWeights:
    return weights.map(lambda w: w.to(device), lambda v: v.to(device))

