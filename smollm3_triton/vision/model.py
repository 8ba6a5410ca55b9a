"""The SmolVLM (Idefics3) vision side: SigLIP encoder + pixel-shuffle connector, in torch.

    tiles [T, 3, S, S] -> conv patch embedding (+ bias) + learned position embeddings
      -> for each layer:  x += out(attn(layer_norm1(x)))      bidirectional, q/k/v/out with bias
                          x += fc2(gelu_tanh(fc1(layer_norm2(x))))
      -> post_layernorm -> pixel_shuffle(scale_factor) -> Linear(hidden * s^2 -> text hidden, no bias)
      -> [T * tokens_per_tile, text hidden]: the rows that replace the `<image>` token embeddings

Loaded from an HF folder (`model.vision_model.*`, `model.connector.*` beside the text model's
`model.text_model.*`) or from llama.cpp's mmproj GGUF (`clip.*` keys, `v.*` / `mm.*` tensors,
projector type idefics3). LayerNorm and GELU are not the text model's kernels (rms_norm,
swiglu), so this runs as plain torch; it is a few percent of a request's work.

Position ids are computed as transformers' Idefics3VisionEmbeddings computes them (fractional
coordinates bucketized in float32). For some patch grids (19, 25, 29, 31, ... per side) that
is not the identity, and llama.cpp, which uses the identity, differs there; the published
SmolVLMs' grids (32 x 32, 27 x 27) are the identity.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig, _Fields, _show, is_hf_vision_language
from ..errors import ModelFormatError, RequestError, SourceNotFoundError, UnsupportedModelError
from ..weights import HF_VISION_PREFIXES, _safetensors_files, read_json_object
from .image_processing import (
    IMAGE_TOKEN,
    ImageProcessorConfig,
    ProcessedImage,
    decode_image,
    image_bytes,
    image_prompt,
    preprocess,
)

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
            raise ModelFormatError(f"{source}: field vision_config must be an object, got {_show(vision)}")
        v = _Fields(vision, source, label="vision_config.")
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
                   scale_factor=_Fields(cfg, source).integer("scale_factor", HF_SCALE_FACTOR_DEFAULT),
                   text_hidden_size=text_hidden_size).check(source)

    @classmethod
    def from_mmproj_metadata(cls, md: dict, source: str, text_hidden_size: int | None = None) -> VisionConfig:
        """From llama.cpp's mmproj GGUF (clip.* keys), checked against the width of the text
        model it serves when that is given."""
        c = _Fields(md, source, prefix="clip.", kind="metadata key")
        projector = c.string("projector_type")
        if projector != MMPROJ_PROJECTOR:
            raise c.fail("projector_type", f"is {projector!r}: only {MMPROJ_PROJECTOR!r} (SmolVLM) is supported",
                         UnsupportedModelError)
        if not c.boolean("has_vision_encoder", False):
            raise c.fail("has_vision_encoder", "is not true: the file holds no vision encoder")
        if not c.boolean("use_gelu", False):
            raise c.fail("use_gelu", "is not true: idefics3's encoder uses GELU", UnsupportedModelError)
        v = _Fields(md, source, prefix="clip.vision.", kind="metadata key")
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


_LAYER_ROLES = ("ln1_w", "ln1_b", "q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "out_w", "out_b",
                "ln2_w", "ln2_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")

HF_VISION_NAMES = {
    "patch_w": "model.vision_model.embeddings.patch_embedding.weight",
    "patch_b": "model.vision_model.embeddings.patch_embedding.bias",
    "pos": "model.vision_model.embeddings.position_embedding.weight",
    "post_w": "model.vision_model.post_layernorm.weight", "post_b": "model.vision_model.post_layernorm.bias",
    "proj": "model.connector.modality_projection.proj.weight",
    **{role: f"model.vision_model.encoder.layers.{{i}}.{part}.{kind}"
       for role, part in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("q", "self_attn.q_proj"),
                          ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("out", "self_attn.out_proj"),
                          ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))
       for role, kind in ((f"{role}_w", "weight"), (f"{role}_b", "bias"))},
}

# llama.cpp's names (tools/mtmd/clip-impl.h; gguf-py's MODEL_ARCH.MMPROJ tensor map).
GGUF_VISION_NAMES = {
    "patch_w": "v.patch_embd.weight", "patch_b": "v.patch_embd.bias", "pos": "v.position_embd.weight",
    "post_w": "v.post_ln.weight", "post_b": "v.post_ln.bias", "proj": "mm.model.fc.weight",
    **{role: f"v.blk.{{i}}.{part}.{kind}"
       for role, part in (("ln1", "ln1"), ("ln2", "ln2"), ("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                          ("out", "attn_out"), ("fc1", "ffn_up"), ("fc2", "ffn_down"))
       for role, kind in ((f"{role}_w", "weight"), (f"{role}_b", "bias"))},
}


def _shapes(c: VisionConfig) -> dict[str, tuple[int, ...]]:
    d, f = c.hidden_size, c.intermediate_size
    square = {r: (d, d) for r in ("q_w", "k_w", "v_w", "out_w")}
    vectors = {r: (d,) for r in ("ln1_w", "ln1_b", "q_b", "k_b", "v_b", "out_b", "ln2_w", "ln2_b", "fc2_b",
                                 "post_w", "post_b", "patch_b")}
    return {**square, **vectors, "fc1_w": (f, d), "fc1_b": (f,), "fc2_w": (d, f),
            "patch_w": (d, 3, c.patch_size, c.patch_size), "pos": (c.patches_per_side ** 2, d),
            "proj": (c.text_hidden_size, d * c.scale_factor ** 2)}


def _expected(c: VisionConfig, names: dict[str, str]) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """file name -> (role, layer, shape) of every tensor the vision side reads."""
    shapes = _shapes(c)
    out = {names[r]: (r, None, shapes[r]) for r in ("patch_w", "patch_b", "pos", "post_w", "post_b", "proj")}
    for i in range(c.n_layers):
        out.update({names[r].format(i=i): (r, i, shapes[r]) for r in _LAYER_ROLES})
    return out


def assemble_vision_weights(c: VisionConfig, found: dict[str, tuple[int, ...]], read, names: dict[str, str],
                            prefixes: tuple[str, ...], where) -> VisionWeights:
    """Check every vision tensor's presence and shape (found: name -> shape, from headers
    only), refuse unexpected ones under `prefixes`, then read them (`read(name)` -> fp32)."""
    expected = _expected(c, names)
    for name, (_, _, shape) in expected.items():
        if name not in found:
            raise ModelFormatError(f"{where(name)}: vision tensor {name} is missing")
        if tuple(found[name]) != shape:
            raise ModelFormatError(f"{where(name)}: vision tensor {name} has shape {list(found[name])}, the config "
                                   f"implies {list(shape)}")
    for name in found:
        if name.startswith(prefixes) and name not in expected:
            raise ModelFormatError(f"{where(name)}: unexpected vision tensor {name}: the config implies no such "
                                   f"tensor")
    top, per_layer = {}, [{} for _ in range(c.n_layers)]
    for name, (role, layer, shape) in expected.items():
        t = read(name).reshape(shape)
        (top if layer is None else per_layer[layer])[role] = t
    layers = []
    for p in per_layer:
        layers.append(VisionLayer(
            ln1_w=p["ln1_w"], ln1_b=p["ln1_b"], qkv_w=torch.cat([p["q_w"], p["k_w"], p["v_w"]]),
            qkv_b=torch.cat([p["q_b"], p["k_b"], p["v_b"]]), out_w=p["out_w"], out_b=p["out_b"],
            ln2_w=p["ln2_w"], ln2_b=p["ln2_b"], fc1_w=p["fc1_w"], fc1_b=p["fc1_b"], fc2_w=p["fc2_w"],
            fc2_b=p["fc2_b"]))
    return VisionWeights(layers=layers, **top)


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


# ---------------------------------------------------------------- loading

def load_hf_vision(folder: Path, cfg: dict, text: ModelConfig) -> tuple[VisionConfig, VisionWeights,
                                                                         ImageProcessorConfig, int]:
    """The vision side of an Idefics3 / SmolVLM folder: config, weights, preprocessing, and
    image_token_id from config.json (checked by the caller against the tokenizer)."""
    from safetensors import safe_open

    source = str(folder / "config.json")
    config = VisionConfig.from_hf_config(cfg, text.hidden_size, source)
    image_token_id = _Fields(cfg, source).integer("image_token_id", lo=0)
    if image_token_id >= text.vocab_size:
        raise ModelFormatError(f"{source}: image_token_id {image_token_id} is outside the vocabulary "
                               f"(vocab_size {text.vocab_size})")
    proc_path = folder / "processor_config.json"
    if proc_path.is_file():
        seq_len = read_json_object(proc_path).get("image_seq_len")
        if seq_len is not None and seq_len != config.tokens_per_tile:
            raise ModelFormatError(f"{proc_path}: image_seq_len {_show(seq_len)} differs from the "
                                   f"{config.tokens_per_tile} tokens per tile the vision config gives")
    pre_path = folder / "preprocessor_config.json"
    processor = ImageProcessorConfig.from_preprocessor_config(read_json_object(pre_path), config.image_size,
                                                              str(pre_path))
    files, _ = _safetensors_files(folder)
    with ExitStack() as stack:
        found, where = {}, {}
        for path in files:
            f = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in f.keys():
                if name.startswith(HF_VISION_PREFIXES):
                    found[name], where[name] = tuple(f.get_slice(name).get_shape()), f
        weights = assemble_vision_weights(config, found, lambda name: where[name].get_tensor(name).float(),
                                          HF_VISION_NAMES, HF_VISION_PREFIXES, lambda name: str(folder))
    return config, weights, processor, image_token_id


def load_mmproj(path: Path, text: ModelConfig) -> tuple[VisionConfig, VisionWeights, ImageProcessorConfig]:
    """llama.cpp's mmproj GGUF of projector type idefics3."""
    from ..gguf.constants import SUPPORTED_TYPES, type_name
    from ..gguf.reader import GGUFFile

    source = str(path)
    with GGUFFile(path) as g:
        md = g.metadata
        arch = md.get("general.architecture")
        if arch != "clip":
            raise ModelFormatError(f"{source}: general.architecture is {_show(arch)}; an mmproj file is 'clip'")
        config = VisionConfig.from_mmproj_metadata(md, source, text.hidden_size)
        v = _Fields(md, source, prefix="clip.vision.", kind="metadata key")
        longest = v.integer("preproc_image_size", 4 * config.image_size, hi=4096)
        processor = ImageProcessorConfig.from_preprocessor_config(
            {"size": {"longest_edge": longest}, "image_mean": md.get("clip.vision.image_mean"),
             "image_std": md.get("clip.vision.image_std")}, config.image_size, source)

        def read(name: str) -> torch.Tensor:
            info = g.tensors[name]
            if info.qtype not in SUPPORTED_TYPES:
                raise UnsupportedModelError(f"{source}: tensor {name} has type {type_name(info.qtype)}, which is "
                                            f"not supported")
            return g.quant_tensor(name).dequantize(torch.float32).clone()

        found = {name: info.shape for name, info in g.tensors.items()}
        weights = assemble_vision_weights(config, found, read, GGUF_VISION_NAMES, ("v.", "mm."), lambda _: source)
    return config, weights, processor


# ---------------------------------------------------------------- chat messages with images

def template_takes_parts(template: str) -> bool:
    """Whether a chat template reads OpenAI-style content parts (SmolVLM's iterates
    `message['content']` and tests each part's type); text-only templates want a string."""
    return any(s in template for s in ("['type']", '["type"]', ".type "))


def split_image_parts(messages: list, takes_parts: bool) -> tuple[list, list[tuple[str, str]]]:
    """Messages as the template wants them, each image part an `<image>` placeholder (a
    {"type": "image"} part, or the text "<image>" in a joined string), and the image URLs
    in order with where each was found."""
    out, urls = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and takes_parts:
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                if not isinstance(url, dict) or not isinstance(url.get("url"), str):
                    raise RequestError(f"{where}: an image_url part is {{'type': 'image_url', 'image_url': "
                                       f"{{'url': 'data:...' or a local path}}}}")
                urls.append((url["url"], where))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{where}: parts are {{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
                                   f"...}}, got {kind!r}")
        if not takes_parts:
            parts = "\n".join(p["text"] if p["type"] == "text" else IMAGE_TOKEN for p in parts)
        out.append({**message, "content": parts})
    return out, urls


def expand_images(vision: VisionModel, text: str, urls: list[tuple[str, str]], tokenize, local_images: bool = True):
    """A rendered prompt with one `<image>` per image -> its token ids (each placeholder
    expanded as Idefics3Processor does) and the engine's mm_embeds: (offset, features, image
    digest) for each run of image tokens. Every image is read and checked before any is
    encoded; local_images: whether file paths may be read (data: URLs always are)."""
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(urls):
        raise RequestError(f"the prompt holds {len(pieces) - 1} {IMAGE_TOKEN} placeholders for {len(urls)} images: "
                           f"the text may not contain {IMAGE_TOKEN} itself")
    images = [vision.load_image(image_bytes(url, where, local_images), where) for url, where in urls]
    expanded = pieces[0] + "".join(vision.prompt(im) + piece for im, piece in zip(images, pieces[1:]))
    ids = tokenize(expanded)
    positions = [p for p, t in enumerate(ids) if t == vision.image_token_id]
    mm_embeds, used = [], 0
    for image in images:
        features, digest = vision.features(image), image.digest
        n = features.shape[0]
        mine = positions[used:used + n]
        if len(mine) != n:
            raise RequestError(f"the prompt has {len(positions)} image tokens, fewer than the images' features")
        # One entry per contiguous run (a tile's tokens sit between its markers).
        start = 0
        for k in range(1, n + 1):
            if k == n or mine[k] != mine[k - 1] + 1:
                mm_embeds.append((mine[start], features[start:k], digest))
                start = k
        used += n
    if used != len(positions):
        raise RequestError(f"the prompt has {len(positions)} image tokens but the images give {used} features")
    return ids, mm_embeds


def load_vision(path: Path, mmproj, text: ModelConfig, tokenizer, device: torch.device,
                dtype: torch.dtype) -> VisionModel | None:
    """The vision side of what Runtime.load opens: a SmolVLM folder's own, or an mmproj GGUF's
    beside a text GGUF; None for a text-only model."""
    if path.is_dir():
        if mmproj is not None:
            raise RequestError(f"mmproj= goes with a text GGUF; the folder {path} carries its own vision encoder")
        cfg = read_json_object(path / "config.json")
        if not is_hf_vision_language(cfg):
            return None
        config, weights, processor, image_token_id = load_hf_vision(path, cfg, text)
        if tokenizer.token_to_id(IMAGE_TOKEN) != image_token_id:
            raise ModelFormatError(f"{path}: config.json's image_token_id {image_token_id} is not the tokenizer's "
                                   f"{IMAGE_TOKEN} token ({tokenizer.token_to_id(IMAGE_TOKEN)})")
    elif mmproj is None:
        return None
    else:
        mmproj = Path(mmproj)
        if not mmproj.is_file():
            raise SourceNotFoundError(f"mmproj file {mmproj} does not exist")
        config, weights, processor = load_mmproj(mmproj, text)
        image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if image_token_id is None:
            raise ModelFormatError(f"{path}: the vocabulary has no {IMAGE_TOKEN} token, so this text model cannot "
                                   f"take the images of {mmproj}")
    return VisionModel(config, weights, processor, image_token_id=image_token_id, device=device, dtype=dtype)
