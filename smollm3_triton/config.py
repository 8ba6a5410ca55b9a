"""`ModelConfig`: one dataclass for SmolLM3 and SmolLM2, read from GGUF metadata or HF config.json.

SmolLM2 is SmolLM3 with RoPE on every layer; `use_rope[i]` says per layer.

Both readers treat their input as untrusted: every field is type- and
range-checked, and every refusal is a ModelFormatError (missing, mistyped or
contradictory) or UnsupportedModelError (valid, but not something this runtime
computes) naming the source, the field and the value. Nothing is allocated in
proportion to a declared size here, except one bool per layer, and the layer
count is capped first.

Decisions:
- Integers must be JSON/GGUF integers: 2048.0 is refused where a size is
  expected (transformers' strict configs refuse it too).
- hidden_size not divisible by the head count is refused unless head_dim is
  given (transformers would silently floor it).
- no_rope_layers needs at least one 0/1 entry per layer; extra trailing
  entries are ignored, as transformers documents ("at least the same length").
- A safetensors model must say what it is: when both `architectures` and
  `model_type` are present they must agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ModelFormatError, UnsupportedModelError

# GGUF architectures and HF model classes we run, mapped to our arch name.
GGUF_ARCHES = {"llama": "llama", "smollm3": "smollm3"}
# VLlama3ForCausalLM: the text_config of SmolVLM folders (a Llama); llama.cpp converts it as llama.
HF_ARCHES = {"LlamaForCausalLM": "llama", "SmolLM3ForCausalLM": "smollm3", "VLlama3ForCausalLM": "llama"}
HF_MODEL_TYPES = {"llama": "llama", "smollm3": "smollm3"}

# Vision-language folders (SmolVLM): a vision encoder beside a text model configured by text_config.
# SmolVLM-256M/500M/2.2B are Idefics3 classes, SmolVLM2 its SmolVLM twin (same tensors, same processor).
HF_VISION_ARCHES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
HF_VISION_MODEL_TYPES = ("idefics3", "smolvlm")

# llama.cpp's smollm3 graph skips RoPE on every 4th layer; GGUF files carry no key for it.
GGUF_SMOLLM3_NOPE_INTERVAL = 4

# llama.cpp's LLAMA_MAX_LAYERS. Bounds the per-layer work a damaged count can ask for
# before any tensor is looked at (the largest open models have ~130 layers).
MAX_LAYERS = 512

# transformers' `default_theta` per config class, used when config.json names no rope_theta.
HF_DEFAULT_ROPE_THETA = {"llama": 10_000.0, "smollm3": 2_000_000.0}

# Token-id fields of config.json that must index the embedding table when present.
HF_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN, with Hugging Face's parameter names and defaults."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


_REQUIRED = object()


def show_value(value, limit: int = 80) -> str:
    """repr of a value from the file, cut short: a hostile value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ConfigFields:
    """Typed reads from one mapping of a config; every failure names source and field.

    A value of None counts as absent: config.json writes unset fields as null.
    """

    def __init__(self, data: dict, source: str, *, prefix: str = "", label: str = "", kind: str = "field"):
        """prefix: of every key looked up (GGUF's "{arch}."); label: of every key shown in messages."""
        self.data, self.source, self.prefix, self.kind = data, source, prefix, kind
        self.label = label or prefix

    def name(self, key: str) -> str:
        return f"{self.kind} {self.label}{key}"

    def fail(self, key: str, problem: str, error=ModelFormatError) -> Exception:
        return error(f"{self.source}: {self.name(key)} {problem}")

    def attention_heads(self, heads: str, kv_heads: str, hidden: str, head_dim: str) -> tuple[int, int, int]:
        """(heads, kv heads, head dim) from the four fields every format names its own way; the head
        dim is the hidden size over the heads unless the file gives it."""
        n_heads = self.integer(heads)
        n_kv = self.integer(kv_heads, n_heads)
        if n_heads % n_kv:
            raise self.fail(heads, f"({n_heads}) is not a multiple of {self.label}{kv_heads} ({n_kv})")
        width = self.integer(hidden)
        if self.has(head_dim):
            dim, key = self.integer(head_dim), head_dim
        elif width % n_heads:
            raise self.fail(hidden, f"({width}) is not divisible by {self.label}{heads} ({n_heads}) and there is "
                                    f"no {self.label}{head_dim}")
        else:
            dim, key = width // n_heads, hidden
        if dim % 2:
            raise self.fail(key, f"gives a head dim of {dim}, which must be even for RoPE")
        return n_heads, n_kv, dim

    def has(self, key: str) -> bool:
        return self.data.get(self.prefix + key) is not None

    def raw(self, key: str, default=_REQUIRED):
        value = self.data.get(self.prefix + key)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(key, "is missing")
            return default
        return value

    # The typed reads return `default` as it is when the field is absent.
    def integer(self, key: str, default=_REQUIRED, *, lo: int = 1, hi: int | None = None) -> int:
        if not self.has(key):
            return self.raw(key, default)
        value = self.data[self.prefix + key]
        if not _is_int(value):
            raise self.fail(key, f"must be an integer, got {show_value(value)}")
        if value < lo or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise self.fail(key, f"must be {bounds}, got {value}")
        return value

    def number(self, key: str, default=_REQUIRED, *, positive: bool = True) -> float:
        if not self.has(key):
            return self.raw(key, default)
        value = self.data[self.prefix + key]
        if not _is_number(value) or not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {show_value(value)}")
        if positive and value <= 0:
            raise self.fail(key, f"must be > 0, got {value}")
        return float(value)

    def boolean(self, key: str, default=_REQUIRED) -> bool:
        if not self.has(key):
            return self.raw(key, default)
        value = self.data[self.prefix + key]
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {show_value(value)}")
        return value

    def string(self, key: str, default=_REQUIRED) -> str:
        if not self.has(key):
            return self.raw(key, default)
        value = self.data[self.prefix + key]
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {show_value(value)}")
        return value


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    use_rope: tuple[bool, ...]
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        # The readers below check everything with the file's own field names; this
        # catches a ModelConfig built by hand.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ModelFormatError(f"config field {name} must be a positive integer, got {value!r}")
        if len(self.use_rope) != self.n_layers:
            raise ModelFormatError(f"no_rope_layers has {len(self.use_rope)} entries, expected one per layer ({self.n_layers})")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ModelFormatError(f"config field {name} must be a finite positive number, got {value!r}")

    @property
    def qkv_rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    # --- from GGUF -----------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict, source: str = "GGUF") -> ModelConfig:
        arch = md.get("general.architecture")
        if not isinstance(arch, str) or arch not in GGUF_ARCHES:
            raise UnsupportedModelError(
                f"{source}: architecture {show_value(arch)} is not supported (supported: {sorted(GGUF_ARCHES)})")
        f = ConfigFields(md, source, prefix=f"{arch}.", kind="metadata key")

        n_layers = f.integer("block_count", hi=MAX_LAYERS)
        hidden = f.integer("embedding_length")
        n_heads, n_kv, head_dim = f.attention_heads("attention.head_count", "attention.head_count_kv",
                                                    "embedding_length", "attention.key_length")
        if f.integer("attention.value_length", head_dim) != head_dim:
            raise f.fail("attention.value_length", f"{md[f'{arch}.attention.value_length']} differs from the key "
                                                   f"length {head_dim}", UnsupportedModelError)
        if f.integer("rope.dimension_count", head_dim) != head_dim:
            raise f.fail("rope.dimension_count", f"{md[f'{arch}.rope.dimension_count']} is not the head dim "
                                                 f"{head_dim}: partial RoPE is not supported", UnsupportedModelError)
        if f.integer("expert_count", 0, lo=0):
            raise f.fail("expert_count", f"is {md[f'{arch}.expert_count']}: mixture-of-experts models are not "
                                         f"supported", UnsupportedModelError)
        tokens = md.get("tokenizer.ggml.tokens")
        if f.has("vocab_size"):
            vocab = f.integer("vocab_size")
        elif isinstance(tokens, list) and tokens:
            vocab = len(tokens)  # what llama.cpp does when the key is absent
        else:
            raise f.fail("vocab_size", "is missing and there is no tokenizer.ggml.tokens list to count")
        if arch == "smollm3":
            use_rope = tuple((i + 1) % GGUF_SMOLLM3_NOPE_INTERVAL != 0 for i in range(n_layers))
        else:
            use_rope = (True,) * n_layers

        scaling = None
        kind = f.string("rope.scaling.type", "none")
        if kind == "yarn":
            scaling = RopeScaling(factor=f.number("rope.scaling.factor"),
                                  original_max_position_embeddings=f.integer("rope.scaling.original_context_length"),
                                  beta_fast=f.number("rope.scaling.yarn_beta_fast", 32.0, positive=False),
                                  beta_slow=f.number("rope.scaling.yarn_beta_slow", 1.0, positive=False))
        elif kind != "none" and not (kind == "linear" and f.number("rope.scaling.factor", 1.0) == 1.0):
            raise f.fail("rope.scaling.type", f"{kind!r} is not supported (only yarn)", UnsupportedModelError)
        return cls(arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=f.integer("feed_forward_length"),
                   n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                   rms_norm_eps=f.number("attention.layer_norm_rms_epsilon"),
                   rope_theta=f.number("rope.freq_base", 10000.0),
                   max_position_embeddings=f.integer("context_length"), use_rope=use_rope,
                   tie_word_embeddings=False, rope_scaling=scaling)

    # --- from HF config.json -------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        if not isinstance(cfg, dict):
            raise ModelFormatError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        f = ConfigFields(cfg, source)
        arch = _hf_arch(f)
        if f.has("quantization_config"):
            quant = cfg["quantization_config"]
            method = quant.get("quant_method") if isinstance(quant, dict) else None
            raise f.fail("quantization_config", f"(quant_method {show_value(method)}) is present: pre-quantized "
                                                f"safetensors are not supported; use a GGUF file",
                         UnsupportedModelError)
        act = f.string("hidden_act", "silu")
        if act not in ("silu", "swish"):  # one function under two names in transformers' ACT2FN
            raise f.fail("hidden_act", f"{act!r} is not supported (only silu)", UnsupportedModelError)
        for key in ("attention_bias", "mlp_bias"):
            if f.boolean(key, False):
                raise f.fail(key, "is true: bias terms are not supported", UnsupportedModelError)

        n_layers = f.integer("num_hidden_layers", hi=MAX_LAYERS)
        hidden = f.integer("hidden_size")
        n_heads, n_kv, head_dim = f.attention_heads("num_attention_heads", "num_key_value_heads", "hidden_size",
                                                    "head_dim")
        vocab = f.integer("vocab_size")
        max_pos = f.integer("max_position_embeddings")
        for key in HF_TOKEN_ID_FIELDS:
            ids = f.raw(key, [])
            for token_id in ids if isinstance(ids, list) else [ids]:
                if not _is_int(token_id) or not 0 <= token_id < vocab:
                    raise f.fail(key, f"{show_value(token_id)} is not a token id in 0..{vocab - 1} (vocab_size {vocab})")
        _hf_check_attention_layout(f, n_layers)
        rope_theta, scaling = _hf_rope(f, arch, max_pos)
        return cls(arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=f.integer("intermediate_size"),
                   n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                   rms_norm_eps=f.number("rms_norm_eps", 1e-6), rope_theta=rope_theta,
                   max_position_embeddings=max_pos, use_rope=_hf_use_rope(f, arch, n_layers),
                   tie_word_embeddings=f.boolean("tie_word_embeddings", arch == "smollm3"),
                   rope_scaling=scaling)


def is_hf_vision_language(cfg: dict) -> bool:
    archs = cfg.get("architectures")
    return cfg.get("model_type") in HF_VISION_MODEL_TYPES or (
        isinstance(archs, list) and any(a in HF_VISION_ARCHES for a in archs))


def hf_text_config(cfg: dict, source: str) -> tuple[dict, str]:
    """The config.json object the text model is read from, and the name errors give it:
    the file itself, or a SmolVLM folder's text_config, whose head is tied or not as the
    outer model's tie_word_embeddings says (transformers ties the outer model's lm_head)."""
    if not isinstance(cfg, dict) or not is_hf_vision_language(cfg):
        return cfg, source
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelFormatError(f"{source}: field text_config must be an object, got {show_value(text)}")
    tie = ConfigFields(cfg, source).boolean("tie_word_embeddings", False)
    return {**text, "tie_word_embeddings": tie}, f"{source} text_config"


def _hf_arch(f: ConfigFields) -> str:
    """Our arch name from `model_type` (what transformers' Auto classes dispatch on) and
    `architectures` (the class saved with the weights); both, when present, must agree."""
    archs = f.raw("architectures", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise f.fail("architectures", f"must be a list of class names, got {show_value(archs)}")
    model_type = f.string("model_type", "")
    if model_type and model_type not in HF_MODEL_TYPES:
        raise f.fail("model_type", f"{model_type!r} is not supported (supported: {sorted(HF_MODEL_TYPES)})",
                     UnsupportedModelError)
    if archs and not any(a in HF_ARCHES for a in archs):
        raise f.fail("architectures", f"{archs} names no supported model class (supported: {sorted(HF_ARCHES)})",
                     UnsupportedModelError)
    from_archs = {HF_ARCHES[a] for a in archs if a in HF_ARCHES}
    if not model_type and not from_archs:
        raise ModelFormatError(f"{f.source}: neither model_type nor architectures says what model this is")
    if model_type and from_archs and from_archs != {HF_MODEL_TYPES[model_type]}:
        raise f.fail("model_type", f"{model_type!r} contradicts architectures {archs}")
    return HF_MODEL_TYPES[model_type] if model_type else from_archs.pop()


def _hf_check_attention_layout(f: ConfigFields, n_layers: int) -> None:
    if f.boolean("use_sliding_window", False) and f.has("sliding_window"):
        raise f.fail("use_sliding_window", f"is true with sliding_window {show_value(f.raw('sliding_window'))}: "
                                           f"sliding-window attention is not supported", UnsupportedModelError)
    layer_types = f.raw("layer_types", None)
    if layer_types is None:
        return
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise f.fail("layer_types", f"must be a list of strings, got {show_value(layer_types)}")
    if len(layer_types) < n_layers:
        raise f.fail("layer_types", f"has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
    for i, kind in enumerate(layer_types[:n_layers]):
        if kind != "full_attention":
            raise f.fail("layer_types", f"[{i}] is {kind!r}: only full_attention is supported", UnsupportedModelError)


def _hf_use_rope(f: ConfigFields, arch: str, n_layers: int) -> tuple[bool, ...]:
    if arch != "smollm3":
        return (True,) * n_layers
    nope = f.raw("no_rope_layers", None)
    if nope is None:
        interval = f.integer("no_rope_layer_interval", 4)
        return tuple((i + 1) % interval != 0 for i in range(n_layers))
    if not isinstance(nope, list):
        raise f.fail("no_rope_layers", f"must be a list with a 0 or 1 per layer, got {show_value(nope)}")
    if len(nope) < n_layers:
        raise f.fail("no_rope_layers", f"has {len(nope)} entries but num_hidden_layers is {n_layers}")
    for i, v in enumerate(nope):
        if not isinstance(v, int) or v not in (0, 1):  # bools are ints: JSON true/false read as 1/0
            raise f.fail("no_rope_layers", f"[{i}] is {show_value(v)}; entries must be 1 (RoPE) or 0 (no RoPE)")
    return tuple(v == 1 for v in nope[:n_layers])


def _hf_rope(f: ConfigFields, arch: str, max_pos: int) -> tuple[float, RopeScaling | None]:
    """rope_theta and YaRN from transformers >= 5's `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling`."""
    params = f.raw("rope_parameters", {})
    legacy = f.raw("rope_scaling", {})
    for key, value in (("rope_parameters", params), ("rope_scaling", legacy)):
        if not isinstance(value, dict):
            raise f.fail(key, f"must be an object, got {show_value(value)}")
    if any(isinstance(v, dict) for v in params.values()):
        raise f.fail("rope_parameters", "is nested per layer type, which is not supported", UnsupportedModelError)
    p = ConfigFields(params, f.source, label="rope_parameters.")
    theta = p.number("rope_theta") if p.has("rope_theta") else f.number("rope_theta", HF_DEFAULT_ROPE_THETA[arch])
    for where in (f, p):
        if where.number("partial_rotary_factor", 1.0) != 1.0:
            raise where.fail("partial_rotary_factor", f"is {where.raw('partial_rotary_factor')}: partial RoPE is "
                                                      f"not supported", UnsupportedModelError)
    s = ConfigFields(legacy, f.source, label="rope_scaling.") if legacy else p
    kind = s.string("rope_type", None) or s.string("type", "default")
    if kind == "default" or (kind == "linear" and s.number("factor", 1.0) == 1.0):
        return theta, None
    if kind != "yarn":
        raise s.fail("rope_type", f"{kind!r} is not supported (only yarn)", UnsupportedModelError)
    original = s.integer("original_max_position_embeddings", f.integer("original_max_position_embeddings", max_pos))
    factor = s.number("factor", max_pos / original)  # transformers' fallback when factor is null
    attention_factor = s.number("attention_factor", None)
    if attention_factor is None and s.has("mscale") and s.has("mscale_all_dim"):
        raise s.fail("mscale", "with mscale_all_dim (DeepSeek's YaRN variant) is not supported", UnsupportedModelError)
    return theta, RopeScaling(factor=factor, original_max_position_embeddings=original,
                              beta_fast=s.number("beta_fast", 32.0, positive=False),
                              beta_slow=s.number("beta_slow", 1.0, positive=False),
                              attention_factor=attention_factor, truncate=s.boolean("truncate", True))


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] in float64, and the cos/sin scale (YaRN's attention factor)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    pos_freqs = config.rope_theta ** exponents
    inv_freq = 1.0 / pos_freqs
    s = config.rope_scaling
    if s is None:
        return inv_freq, 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between
    # the dimensions that turn beta_fast and beta_slow times over the original context.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))
    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = inv_freq / s.factor * (1 - extrapolate) + inv_freq * extrapolate
    scale = s.attention_factor if s.attention_factor is not None else (
        0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return inv_freq, float(scale)


def rope_tables(config: ModelConfig, max_seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim/2] float32, computed in float64 so angles stay exact at 128k."""
    inv_freq, scale = rope_inv_freq(config)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ((angles.cos() * scale).float().to(device), (angles.sin() * scale).float().to(device))
