"""The SmolVLM (Idefics3) vision side: SigLIP encoder + pixel-shuffle connector, in torch.

    tiles [T, 3, S, S] -> conv patch embedding (+ bias) + learned position embeddings
      -> for each layer:  x += out(attn(layer_norm1(x)))      bidirectional, q/k/v/out with bias
                          x += fc2(gelu_tanh(fc1(layer_norm2(x))))
      -> post_layernorm -> pixel_shuffle(scale_factor) -> Linear(hidden * s^2 -> text hidden, no bias)
      -> [T * tokens_per_tile, text hidden]: the rows that replace the `<image>` token embeddings

LayerNorm and GELU are not the text model's kernels (rms_norm, swiglu), so this runs as
plain torch; it is a few percent of a request's work. vision/loader.py reads the weights.

Position ids are computed as transformers' Idefics3VisionEmbeddings computes them (fractional
coordinates bucketized in float32). For some patch grids (19, 25, 29, 31, ... per side) that
is not the identity, and llama.cpp, which uses the identity, differs there; the published
SmolVLMs' grids (32 x 32, 27 x 27) are the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigFields, show_value
from ..errors import ModelFormatError, UnsupportedModelError
from .image_processing import ImageProcessorConfig, ProcessedImage, decode_image, image_prompt, preprocess

# transformers' Idefics3VisionConfig defaults, used where config.json leaves a field out
# (SmolVLM2's configs do), as transformers and llama.cpp's converter do.
HF_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                          image_size=224, patch_size=32, layer_norm_eps=1e-6)
HF_SCALE_FACTOR_DEFAULT = 2
MMPROJ_PROJECTOR = "idefics3"


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    image_size: int            # the side of one tile
    patch_size: int
    layer_norm_eps: float
    scale_factor: int          # pixel shuffle: s x s patches become one token
    text_hidden_size: int      # the connector's output: the text model's embedding width

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return (self.patches_per_side // self.scale_factor) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def check(self, source: str) -> VisionConfig:
        if self.image_size % self.patch_size:
            raise ModelFormatError(f"{source}: vision image_size {self.image_size} is not a multiple of patch_size "
                                   f"{self.patch_size}")
        if self.patches_per_side % self.scale_factor:
            raise ModelFormatError(f"{source}: {self.patches_per_side} patches per side do not divide by the "
                                   f"scale_factor {self.scale_factor}")
        if self.hidden_size % self.n_heads:
            raise ModelFormatError(f"{source}: vision hidden_size {self.hidden_size} is not divisible by its "
                                   f"{self.n_heads} attention heads")
        return self

    @classmethod
    def from_hf_config(cls, cfg: dict, text_hidden_size: int, source: str) -> VisionConfig:
        """From an Idefics3 / SmolVLM config.json (the whole object)."""
        vision = cfg.get("vision_config")
        if not isinstance(vision, dict):
            raise ModelFormatError(f"{source}: field vision_config must be an object, got {show_value(vision)}")
        v = ConfigFields(vision, source, label="vision_config.")
        act = v.string("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise v.fail("hidden_act", f"{act!r} is not supported (only gelu_pytorch_tanh)", UnsupportedModelError)
        if v.integer("num_channels", 3) != 3:
            raise v.fail("num_channels", f"is {vision['num_channels']}: only RGB (3) is supported",
                         UnsupportedModelError)
        d = HF_VISION_DEFAULTS
        return cls(hidden_size=v.integer("hidden_size", d["hidden_size"]),
                   intermediate_size=v.integer("intermediate_size", d["intermediate_size"]),
                   n_layers=v.integer("num_hidden_layers", d["num_hidden_layers"], hi=1024),
                   n_heads=v.integer("num_attention_heads", d["num_attention_heads"]),
                   image_size=v.integer("image_size", d["image_size"], hi=4096),
                   patch_size=v.integer("patch_size", d["patch_size"]),
                   layer_norm_eps=v.number("layer_norm_eps", d["layer_norm_eps"]),
                   scale_factor=ConfigFields(cfg, source).integer("scale_factor", HF_SCALE_FACTOR_DEFAULT),
                   text_hidden_size=text_hidden_size).check(source)

    @classmethod
    def from_mmproj_metadata(cls, md: dict, source: str, text_hidden_size: int | None = None) -> VisionConfig:
        """From llama.cpp's mmproj GGUF (clip.* keys), checked against the width of the text
        model it serves when that is given."""
        c = ConfigFields(md, source, prefix="clip.", kind="metadata key")
        projector = c.string("projector_type")
        if projector != MMPROJ_PROJECTOR:
            raise c.fail("projector_type", f"is {projector!r}: only {MMPROJ_PROJECTOR!r} (SmolVLM) is supported",
                         UnsupportedModelError)
        if not c.boolean("has_vision_encoder", False):
            raise c.fail("has_vision_encoder", "is not true: the file holds no vision encoder")
        if not c.boolean("use_gelu", False):
            raise c.fail("use_gelu", "is not true: idefics3's encoder uses GELU", UnsupportedModelError)
        v = ConfigFields(md, source, prefix="clip.vision.", kind="metadata key")
        projection = v.integer("projection_dim")
        if text_hidden_size is not None and projection != text_hidden_size:
            raise v.fail("projection_dim", f"{projection} differs from the text model's embedding length "
                                           f"{text_hidden_size}: this mmproj belongs to another model")
        return cls(hidden_size=v.integer("embedding_length"), intermediate_size=v.integer("feed_forward_length"),
                   n_layers=v.integer("block_count", hi=1024), n_heads=v.integer("attention.head_count"),
                   image_size=v.integer("image_size", hi=4096), patch_size=v.integer("patch_size"),
                   layer_norm_eps=v.number("attention.layer_norm_epsilon"),
                   scale_factor=v.integer("projector.scale_factor", HF_SCALE_FACTOR_DEFAULT),
                   text_hidden_size=projection).check(source)


# ---------------------------------------------------------------- weights

@dataclass(frozen=True)
class VisionLayer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor        # [3 * hidden, hidden]: q, k, v rows fused at load
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


@dataclass(frozen=True)
class VisionWeights:
    patch_w: torch.Tensor      # [hidden, 3, patch, patch]
    patch_b: torch.Tensor
    pos: torch.Tensor          # [patches_per_side^2, hidden]
    layers: list[VisionLayer]
    post_w: torch.Tensor
    post_b: torch.Tensor
    proj: torch.Tensor         # [text hidden, hidden * scale^2]

    def map(self, fn) -> VisionWeights:
        layers = [VisionLayer(**{k: fn(t) for k, t in vars(layer).items()}) for layer in self.layers]
        return VisionWeights(**{k: fn(t) for k, t in vars(self).items() if k != "layers"}, layers=layers)


# ---------------------------------------------------------------- the encoder

def position_ids(c: VisionConfig) -> torch.Tensor:
    """Idefics3VisionEmbeddings' position ids of a full tile, computed the way it computes them."""
    n = c.patches_per_side
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    coords = (torch.arange(n, dtype=torch.float32) * (1.0 / torch.tensor(n))).clamp(max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)
    return (buckets[:, None] * n + buckets[None, :]).reshape(-1)


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """[T, n*n, D] -> [T, n*n/s^2, D*s^2]: each s x s block of patches becomes one token."""
    t, seq, d = x.shape
    n = int(seq ** 0.5)
    x = x.view(t, n, n // s, d * s).permute(0, 2, 1, 3)
    x = x.reshape(t, n // s, n // s, d * s * s).permute(0, 2, 1, 3)
    return x.reshape(t, seq // (s * s), d * s * s)


def encode_tiles(c: VisionConfig, w: VisionWeights, pixels: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
    """tiles [T, 3, S, S] -> image features [T * tokens_per_tile, text hidden]."""
    return connect(c, w, vision_encoder(c, w, pixels, pos_ids))


def vision_encoder(c: VisionConfig, w: VisionWeights, pixels: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
    """The SigLIP encoder: tiles [T, 3, S, S] -> [T, patches, hidden] after post_layernorm."""
    t = pixels.shape[0]
    x = F.conv2d(pixels.to(w.patch_w.dtype), w.patch_w, w.patch_b, stride=c.patch_size)
    x = x.flatten(2).transpose(1, 2) + w.pos[pos_ids]
    d, heads, hd = c.hidden_size, c.n_heads, c.head_dim
    for layer in w.layers:
        h = F.layer_norm(x, (d,), layer.ln1_w, layer.ln1_b, c.layer_norm_eps)
        q, k, v = F.linear(h, layer.qkv_w, layer.qkv_b).view(t, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        scores = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1, dtype=torch.float32).to(q.dtype)
        attn = (scores @ v).transpose(1, 2).reshape(t, -1, d)
        x = x + F.linear(attn, layer.out_w, layer.out_b)
        h = F.layer_norm(x, (d,), layer.ln2_w, layer.ln2_b, c.layer_norm_eps)
        x = x + F.linear(F.gelu(F.linear(h, layer.fc1_w, layer.fc1_b), approximate="tanh"), layer.fc2_w, layer.fc2_b)
    return F.layer_norm(x, (d,), w.post_w, w.post_b, c.layer_norm_eps)


def connect(c: VisionConfig, w: VisionWeights, x: torch.Tensor) -> torch.Tensor:
    """The connector: [T, patches, hidden] -> pixel shuffle -> projection -> [T * tokens_per_tile, text hidden]."""
    return F.linear(pixel_shuffle(x, c.scale_factor), w.proj).reshape(-1, c.text_hidden_size)


class VisionModel:
    """What a SmolVLM runtime adds to the text model: image bytes -> checked tiles -> the
    prompt text standing for them and the features that replace its `<image>` tokens."""

    def __init__(self, config: VisionConfig, weights: VisionWeights, processor: ImageProcessorConfig, *,
                 image_token_id: int, device: torch.device, dtype: torch.dtype):
        self.config, self.processor, self.image_token_id = config, processor, image_token_id
        self.device, self.dtype = device, dtype
        self.weights = weights.map(lambda t: t.to(device=device, dtype=dtype))
        self.pos_ids = position_ids(config).to(device)

    def load_image(self, data: bytes, where: str = "image") -> ProcessedImage:
        return preprocess(decode_image(data, where), self.processor)

    def prompt(self, image: ProcessedImage) -> str:
        return image_prompt(image, self.config.tokens_per_tile)

    @torch.inference_mode()
    def features(self, image: ProcessedImage) -> torch.Tensor:
        pixels = image.pixel_values.to(device=self.device, dtype=self.dtype)
        return encode_tiles(self.config, self.weights, pixels, self.pos_ids)
