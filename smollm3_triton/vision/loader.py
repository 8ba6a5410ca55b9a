"""The vision side of what Runtime.load opens: a SmolVLM folder's own (`model.vision_model.*`,
`model.connector.*` beside the text model's `model.text_model.*`), or llama.cpp's mmproj GGUF
(`clip.*` keys, `v.*` / `mm.*` tensors, projector type idefics3) beside a text GGUF. Every
tensor's presence and shape is checked against the config before any is read."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from ..config import ConfigFields, ModelConfig, is_hf_vision_language, show_value
from ..errors import ModelFormatError, RequestError, SourceNotFoundError, UnsupportedModelError
from ..weights import HF_VISION_PREFIXES, safetensors_files, read_json_object
from .encoder import VisionConfig, VisionLayer, VisionModel, VisionWeights
from .image_processing import IMAGE_TOKEN, ImageProcessorConfig

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


def load_hf_vision(folder: Path, cfg: dict, text: ModelConfig) -> tuple[VisionConfig, VisionWeights,
                                                                         ImageProcessorConfig, int]:
    """The vision side of an Idefics3 / SmolVLM folder: config, weights, preprocessing, and
    image_token_id from config.json (checked by the caller against the tokenizer)."""
    from safetensors import safe_open

    source = str(folder / "config.json")
    config = VisionConfig.from_hf_config(cfg, text.hidden_size, source)
    image_token_id = ConfigFields(cfg, source).integer("image_token_id", lo=0)
    if image_token_id >= text.vocab_size:
        raise ModelFormatError(f"{source}: image_token_id {image_token_id} is outside the vocabulary "
                               f"(vocab_size {text.vocab_size})")
    proc_path = folder / "processor_config.json"
    if proc_path.is_file():
        seq_len = read_json_object(proc_path).get("image_seq_len")
        if seq_len is not None and seq_len != config.tokens_per_tile:
            raise ModelFormatError(f"{proc_path}: image_seq_len {show_value(seq_len)} differs from the "
                                   f"{config.tokens_per_tile} tokens per tile the vision config gives")
    pre_path = folder / "preprocessor_config.json"
    processor = ImageProcessorConfig.from_preprocessor_config(read_json_object(pre_path), config.image_size,
                                                              str(pre_path))
    files, _ = safetensors_files(folder)
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
            raise ModelFormatError(f"{source}: general.architecture is {show_value(arch)}; an mmproj file is 'clip'")
        config = VisionConfig.from_mmproj_metadata(md, source, text.hidden_size)
        v = ConfigFields(md, source, prefix="clip.vision.", kind="metadata key")
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
