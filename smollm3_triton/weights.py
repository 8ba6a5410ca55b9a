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
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, hf_text_config, is_hf_vision_language
from .errors import ModelFormatError, UnsupportedModelError
from .gguf.constants import SUPPORTED_TYPES, GGMLType, type_name
from .gguf.tensors import QuantTensor, Weight, concat_rows


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


def check_gguf(gguf) -> tuple[ModelConfig, dict[str, str | None]]:
    """The config of an open GGUFFile and the tensor names it uses, after every semantic
    check (metadata types and ranges, token ids, each tensor's presence and shape);
    reads no tensor data."""
    source = str(gguf.path)
    config = ModelConfig.from_gguf_metadata(gguf.metadata, source)
    names = dict(GGUF_NAMES)
    if names["lm_head"] not in gguf.tensors:
        names["lm_head"] = None
        config = _replace(config, tie_word_embeddings=True)
    _check_gguf_token_ids(gguf.metadata, config.vocab_size, source)
    _check_tensor_table({name: info.shape for name, info in gguf.tensors.items()}, _expected_tensors(config, names),
                        config.n_layers, lambda name: source, GGUF_LAYER_RE, harmless=())
    return config, names


def load_gguf(gguf) -> tuple[ModelConfig, ModelWeights]:
    """Config and weights from an open GGUFFile (data stays memory-mapped until moved to a device)."""
    source = str(gguf.path)
    config, names = check_gguf(gguf)

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


# ---------------------------------------------------------------- semantic checks
# Run on names, shapes and metadata only, before any tensor data is read or any
# device memory is allocated.

GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.")
HF_LAYER_RE = re.compile(r"model\.(?:text_model\.)?layers\.(\d+)\.")
HF_VLM_TEXT_PREFIX = "model.text_model."
HF_VISION_PREFIXES = ("model.vision_model.", "model.connector.")
# Buffers older transformers versions saved next to the weights; recomputed from the config.
HF_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


def _expected_tensors(config: ModelConfig, names: dict[str, str | None]) -> dict[str, tuple]:
    """Every tensor the model reads, in load order: file name -> shape the config implies."""
    shapes = _expected_shapes(config)
    per_layer = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down")
    out = {names[role].format(i=i): shapes[role] for i in range(config.n_layers) for role in per_layer}
    out[names["embed"]] = (config.vocab_size, config.hidden_size)
    out[names["norm"]] = (config.hidden_size,)
    if names.get("lm_head") is not None:
        out[names["lm_head"]] = (config.vocab_size, config.hidden_size)
    return out


def _check_tensor_table(found: dict[str, tuple], expected: dict[str, tuple], n_layers: int, where,
                        layer_re: re.Pattern, harmless: tuple[str, ...]) -> None:
    """found (name -> shape in the file) against expected; `where(name)` names the file holding it."""
    for name, shape in expected.items():
        if name not in found:
            missing = [n for n in expected if n not in found]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelFormatError(f"{where(name)}: tensor {name} is missing{more}")
        _check_shape(name, found[name], shape, where(name))
    for name in found:
        if name in expected or name.endswith(harmless):
            continue
        layer = layer_re.match(name)
        if layer and int(layer.group(1)) >= n_layers:
            raise ModelFormatError(f"{where(name)}: tensor {name} belongs to layer {layer.group(1)}, but the config "
                                   f"has {n_layers} layers (0..{n_layers - 1})")
        if name.endswith(".bias") or name == "rope_freqs.weight":
            raise UnsupportedModelError(f"{where(name)}: tensor {name} is not supported (no bias terms or RoPE "
                                        f"frequency factors in the models this runtime runs)")
        raise ModelFormatError(f"{where(name)}: unexpected tensor {name}: the config implies no such tensor")


def _check_gguf_token_ids(md: dict, vocab_size: int, source: str) -> None:
    """The vocabulary fits the embedding table and every special-token id indexes it."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, list):
            raise ModelFormatError(f"{source}: metadata key tokenizer.ggml.tokens must be an array of strings, "
                                   f"got {type(tokens).__name__}")
        if len(tokens) > vocab_size:
            raise ModelFormatError(f"{source}: metadata key tokenizer.ggml.tokens has {len(tokens)} tokens but the "
                                   f"model has only {vocab_size} embeddings (vocab_size)")
    limit = vocab_size if tokens is None else len(tokens)
    for key, value in md.items():
        if not (key.startswith("tokenizer.ggml.") and key.endswith("_token_id")):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelFormatError(f"{source}: metadata key {key} must be an integer token id, got {value!r:.80}")
        if not 0 <= value < limit:
            raise ModelFormatError(f"{source}: metadata key {key} = {value} is outside the vocabulary of "
                                   f"{limit} tokens")


# ---------------------------------------------------------------- safetensors folders

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Real config.json and index files are a few KiB to a few hundred KiB.
MAX_JSON_BYTES = 16 << 20


def read_json_object(path: Path) -> dict:
    """A JSON object from a model folder's file, refused cleanly when missing, huge or malformed."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelFormatError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES}-byte limit for a JSON file")
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file is missing") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFormatError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def safetensors_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read, and the index's tensor -> file map when the model is sharded."""
    index_path = folder / SAFETENSORS_INDEX
    if not index_path.exists():
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if not files:
            raise ModelFormatError(f"{folder}: no *.safetensors files")
        return files, None
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index_path}: weight_map must be a non-empty object of tensor name -> file name")
    for tensor, file in weight_map.items():
        # A bare file name: the index must not reach outside the folder.
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise ModelFormatError(f"{index_path}: weight_map[{tensor!r}] = {file!r:.80} is not a file name")
        if not (folder / file).is_file():
            raise ModelFormatError(f"{index_path}: weight_map[{tensor!r}] names {file}, which is not in {folder}")
    return [folder / f for f in sorted(set(weight_map.values()))], weight_map


def load_safetensors_folder(folder: Path) -> tuple[ModelConfig, ModelWeights]:
    """Config and weights from config.json + *.safetensors (sharded or not).

    Headers are read first (the safetensors library checks their structure:
    offsets inside the file, contiguous, sizes matching dtype x shape); every
    tensor the config implies is then checked for presence, dtype and shape
    before any data is read. Unexpected tensors are refused rather than
    ignored, so biases or extra layers never vanish silently.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{folder}: config.json is missing")
    raw = read_json_object(cfg_path)
    config = ModelConfig.from_hf_config(*hf_text_config(raw, str(cfg_path)))
    # A SmolVLM folder: the text model under model.text_model., the vision side read by vision.py.
    vision_prefixes = HF_VISION_PREFIXES if is_hf_vision_language(raw) else ()
    files, weight_map = safetensors_files(folder)

    with ExitStack() as stack:
        handles, where, headers = {}, {}, {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
                for name in handle.keys():
                    if name in where:
                        raise ModelFormatError(f"{path}: tensor {name} is also in {where[name].name}; a tensor "
                                               f"may be stored only once")
                    info = handle.get_slice(name)
                    where[name], headers[name] = path, (info.get_dtype(), tuple(info.get_shape()))
            except (SafetensorError, OSError) as e:
                raise ModelFormatError(f"{path}: not a valid safetensors file ({e})") from None
            handles[path] = handle
        if weight_map is not None:
            index_path = folder / SAFETENSORS_INDEX
            for name, file in weight_map.items():
                if name not in where:
                    raise ModelFormatError(f"{index_path}: lists tensor {name} in {file}, but no listed file holds it")
                if where[name].name != file:
                    raise ModelFormatError(f"{index_path}: lists tensor {name} in {file}, but it is in "
                                           f"{where[name].name}")
            unlisted = sorted(where.keys() - weight_map.keys())
            if unlisted:
                raise ModelFormatError(f"{where[unlisted[0]]}: tensor {unlisted[0]} is not listed in {index_path}")

        names = dict(HF_NAMES)
        if vision_prefixes:
            names = {role: name.replace("model.", HF_VLM_TEXT_PREFIX, 1) for role, name in names.items()}
        if config.tie_word_embeddings:
            names["lm_head"] = None  # as transformers does: the head is the embedding, a stored copy is unused
        elif names["lm_head"] not in where:
            raise ModelFormatError(f"{folder}: tensor {names['lm_head']} is missing and {cfg_path} has "
                                   f"tie_word_embeddings false")
        expected = _expected_tensors(config, names)
        found = {name: shape for name, (_, shape) in headers.items()
                 if (names["lm_head"] or name != HF_NAMES["lm_head"]) and not name.startswith(vision_prefixes)}
        _check_tensor_table(found, expected, config.n_layers,
                            lambda name: str(where.get(name, folder)), HF_LAYER_RE, HF_HARMLESS_SUFFIXES)
        for name in expected:
            if headers[name][0] not in SAFETENSORS_DTYPES:
                raise UnsupportedModelError(f"{where[name]}: tensor {name} has dtype {headers[name][0]}; expected "
                                            f"one of {', '.join(SAFETENSORS_DTYPES)}")
        tensors = {name: handles[where[name]].get_tensor(name) for name in expected}

    def get(name: str) -> QuantTensor:
        t = tensors[name]
        return QuantTensor(t, TORCH_TO_GGML[t.dtype], tuple(t.shape))

    def get_vector(name: str) -> torch.Tensor:
        return tensors[name].float()

    return config, _assemble(config, get, get_vector, names, str(folder), permute_qk=False)


def to_device(weights: ModelWeights, device: torch.device) -> ModelWeights:
    return weights.map(lambda w: w.to(device), lambda v: v.to(device))

