"""`ModelConfig`: one dataclass for SmolLM3 and SmolLM2, read from GGUF metadata or HF config.json.

SmolLM2 is SmolLM3 with RoPE on every layer; `use_rope[i]` says per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ModelFormatError, UnsupportedModelError

# GGUF architectures and HF model classes we run, mapped to our arch name.
GGUF_ARCHES = {"llama": "llama", "smollm3": "smollm3"}
HF_ARCHES = {"LlamaForCausalLM": "llama", "SmolLM3ForCausalLM": "smollm3"}

# llama.cpp's smollm3 graph skips RoPE on every 4th layer; GGUF files carry no key for it.
GGUF_SMOLLM3_NOPE_INTERVAL = 4


@dataclass(frozen=True)
class RopeScaling:
    """YaRN, with Hugging Face's parameter names and defaults."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


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
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if len(self.use_rope) != self.n_layers:
            raise ModelFormatError(f"no_rope_layers has {len(self.use_rope)} entries, expected one per layer ({self.n_layers})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ModelFormatError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be positive")

    @property
    def qkv_rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    # --- from GGUF -----------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict, source: str = "GGUF") -> ModelConfig:
        arch = md.get("general.architecture")
        if arch not in GGUF_ARCHES:
            raise UnsupportedModelError(
                f"{source}: architecture {arch!r} is not supported (supported: {sorted(GGUF_ARCHES)})")

        def get(key, kind=int, default=None):
            full = f"{arch}.{key}"
            value = md.get(full, default)
            if value is None:
                raise ModelFormatError(f"{source}: metadata key {full} is missing")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ModelFormatError(f"{source}: metadata key {full} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ModelFormatError(f"{source}: metadata key {full} must be a number, got {value!r}")
            return value

        hidden = get("embedding_length")
        n_heads = get("attention.head_count")
        n_layers = get("block_count")
        n_kv = get("attention.head_count_kv", default=n_heads)
        if n_heads <= 0 or hidden % max(n_heads, 1):
            raise ModelFormatError(f"{source}: embedding_length {hidden} is not divisible by head_count {n_heads}")
        head_dim = get("attention.key_length", default=hidden // n_heads)
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = get("vocab_size", default=len(tokens) if isinstance(tokens, list) else None)
        if arch == "smollm3":
            use_rope = tuple((i + 1) % GGUF_SMOLLM3_NOPE_INTERVAL != 0 for i in range(n_layers))
        else:
            use_rope = (True,) * n_layers
        scaling = None
        kind = md.get(f"{arch}.rope.scaling.type", "none")
        if kind == "yarn":
            scaling = RopeScaling(factor=float(get("rope.scaling.factor", float)),
                                  original_max_position_embeddings=get("rope.scaling.original_context_length"),
                                  beta_fast=float(md.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                                  beta_slow=float(md.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)))
        elif kind != "none" and not (kind == "linear" and md.get(f"{arch}.rope.scaling.factor", 1.0) == 1.0):
            raise UnsupportedModelError(f"{source}: rope scaling {kind!r} is not supported (only yarn)")
        return cls(arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
                   n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                   rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", float)),
                   rope_theta=float(get("rope.freq_base", float, default=10000.0)),
                   max_position_embeddings=get("context_length"), use_rope=use_rope,
                   tie_word_embeddings=False, rope_scaling=scaling)

    # --- from HF config.json -------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHES[a] for a in archs if a in HF_ARCHES), None)
        if arch is None:
            arch = {"llama": "llama", "smollm3": "smollm3"}.get(cfg.get("model_type"))
        if arch is None:
            raise UnsupportedModelError(
                f"{source}: model {archs or cfg.get('model_type')!r} is not supported (supported: {sorted(HF_ARCHES)})")

        def get(key, default=None):
            value = cfg.get(key, default)
            if value is None:
                raise ModelFormatError(f"{source}: field {key!r} is missing")
            return value

        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: attention_bias / mlp_bias are not supported")
        n_layers = get("num_hidden_layers")
        n_heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = cfg.get("head_dim") or hidden // n_heads
        rope = cfg.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling_dict = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        scaling = None
        if scaling_dict:
            kind = scaling_dict.get("rope_type", scaling_dict.get("type"))
            if kind == "yarn":
                scaling = RopeScaling(
                    factor=float(scaling_dict["factor"]),
                    original_max_position_embeddings=int(scaling_dict.get(
                        "original_max_position_embeddings", cfg.get("max_position_embeddings"))),
                    beta_fast=float(scaling_dict.get("beta_fast") or 32.0),
                    beta_slow=float(scaling_dict.get("beta_slow") or 1.0),
                    attention_factor=scaling_dict.get("attention_factor"),
                    truncate=bool(scaling_dict.get("truncate", True)))
            elif kind not in (None, "default"):
                raise UnsupportedModelError(f"{source}: rope scaling {kind!r} is not supported (only yarn)")
        if arch == "smollm3":
            nope = cfg.get("no_rope_layers")
            if nope is None:
                interval = cfg.get("no_rope_layer_interval", 4)
                use_rope = tuple((i + 1) % interval != 0 for i in range(n_layers))
            else:
                use_rope = tuple(bool(v) for v in nope)
        else:
            use_rope = (True,) * n_layers
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise UnsupportedModelError(f"{source}: sliding-window attention is not supported")
        return cls(arch=arch, vocab_size=get("vocab_size"), hidden_size=hidden,
                   intermediate_size=get("intermediate_size"), n_layers=n_layers, n_heads=n_heads,
                   n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
                   max_position_embeddings=get("max_position_embeddings"), use_rope=use_rope,
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "smollm3")),
                   rope_scaling=scaling)


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
