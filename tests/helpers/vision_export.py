"""Small random SmolVLM (Idefics3) models: an HF folder as transformers saves it, the same
model as llama.cpp's pair (text GGUF + mmproj GGUF), and transformers' processor on it.

Imported by tests; not a test file.

What llama.cpp's converter does (convert_hf_to_gguf.py, conversion/smolvlm.py and llama.py,
gguf-py's MODEL_ARCH.MMPROJ tensor map), and what this module mirrors:
- the text GGUF: the `model.text_model.*` tensors renamed `model.*` and converted as a
  LlamaForCausalLM (arch llama), with the SmolVLM tokenizer (its added image tokens);
- the mmproj GGUF (arch "clip", general.type mmproj): `clip.has_vision_encoder`,
  `clip.projector_type` "idefics3", `clip.use_gelu`, `clip.vision.{projection_dim (text
  hidden), image_size, patch_size, embedding_length, feed_forward_length, block_count,
  attention.head_count, attention.layer_norm_epsilon, projector.scale_factor,
  preproc_image_size (size.longest_edge), image_mean, image_std}`; tensors named by
  gguf-py's map (v.patch_embd, v.position_embd, v.blk.N.{attn_q,attn_k,attn_v,attn_out,
  ln1,ln2,ffn_up,ffn_down}, v.post_ln, mm.model.fc); the embeddings stay F32, other
  matrices take the file type, vectors F32.

Checked once by hand against convert_hf_to_gguf.py as vendored in llama-cpp-python 0.3.36
(run on save_vlm_folder's output): the mmproj files (f32 and f16) hold the same tensors,
bit for bit, and the same keys but general.name / size_label / quantization_version; the
text GGUF is identical but for general.name. (The converter picks the text model by
text_config.architectures, VLlama3ForCausalLM as in the published SmolVLM configs, which
random_vlm sets too.)
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch

from tests.helpers.gguf_export import GQT, export_gguf, smollm2_tokenizer, write_hf_tokenizer

# The tokens Idefics3Processor needs, appended to the SmolLM2 vocabulary as SmolVLM's are.
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]

# SmolVLM-Instruct's chat template: content parts, `<image>` for each image part.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def vlm_tokenizer() -> dict:
    """The SmolLM2 GGUF tokenizer keys with IMAGE_TOKENS appended as CONTROL tokens, and
    SmolVLM's chat template."""
    tok = dict(smollm2_tokenizer(), **{"tokenizer.chat_template": SMOLVLM_CHAT_TEMPLATE})
    tok["tokenizer.ggml.tokens"] = list(tok["tokenizer.ggml.tokens"]) + IMAGE_TOKENS
    tok["tokenizer.ggml.token_type"] = list(tok["tokenizer.ggml.token_type"]) + \
        [int(gguf.TokenType.CONTROL)] * len(IMAGE_TOKENS)
    return tok


def vocab_size() -> int:
    return len(smollm2_tokenizer()["tokenizer.ggml.tokens"]) + len(IMAGE_TOKENS)


def image_token_id() -> int:
    return len(smollm2_tokenizer()["tokenizer.ggml.tokens"]) + IMAGE_TOKENS.index("<image>")


def random_vlm(*, seed: int = 0, vision: dict | None = None, text: dict | None = None, scale_factor: int = 2,
               tie_word_embeddings: bool = False):
    """A random fp32 Idefics3ForConditionalGeneration: SigLIP hidden 32, 2 layers, 64 px tiles
    of 16 px patches (16 patches -> 4 tokens per tile at scale 2), and a Llama text model of
    hidden 64 over the SmolLM2 vocabulary + IMAGE_TOKENS. Weights N(0, 0.08); norm weights
    1 + N(0, 0.1); LayerNorm biases N(0, 0.1)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tok = smollm2_tokenizer()
    text_config = {**dict(model_type="llama", architectures=["VLlama3ForCausalLM"], vocab_size=vocab_size(), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=2048, rms_norm_eps=1e-5,
                          rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
                          bos_token_id=tok["tokenizer.ggml.bos_token_id"],
                          eos_token_id=tok["tokenizer.ggml.eos_token_id"],
                          pad_token_id=tok["tokenizer.ggml.padding_token_id"]), **(text or {})}
    vision_config = {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            image_size=64, patch_size=16, layer_norm_eps=1e-6), **(vision or {})}
    config = Idefics3Config(text_config=text_config, vision_config=vision_config, scale_factor=scale_factor,
                            image_token_id=image_token_id(), tie_word_embeddings=tie_word_embeddings)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model


def as_smolvlm(model):
    """The same weights as transformers' SmolVLMForConditionalGeneration (SmolVLM2's class)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    c = model.config
    config = SmolVLMConfig(text_config=c.text_config.to_dict(),
                           vision_config={**c.vision_config.to_dict(), "model_type": "smolvlm_vision"},
                           scale_factor=c.scale_factor, image_token_id=c.image_token_id,
                           tie_word_embeddings=c.tie_word_embeddings)
    config._attn_implementation = "eager"
    smolvlm = SmolVLMForConditionalGeneration(config).eval()
    smolvlm.load_state_dict(model.state_dict())
    return smolvlm


def save_vlm_folder(model, folder, *, longest_edge: int = 128, do_image_splitting: bool = True) -> Path:
    """config.json + model.safetensors (save_pretrained), the SmolLM2 tokenizer with
    IMAGE_TOKENS added and SmolVLM's chat template, and preprocessor_config.json as
    Idefics3's image processor saves it."""
    from tokenizers import AddedToken, Tokenizer
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    folder = Path(folder)
    model.save_pretrained(folder)
    write_hf_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    cfg_path = folder / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": SMOLVLM_CHAT_TEMPLATE}))
    tile = model.config.vision_config.image_size
    Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                              do_image_splitting=do_image_splitting).save_pretrained(folder)
    return folder


def hf_processor(folder, model):
    """transformers' Idefics3Processor (PIL image backend) over a save_vlm_folder folder."""
    from transformers import Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    folder = Path(folder)
    c = model.config
    seq_len = (c.vision_config.image_size // c.vision_config.patch_size) ** 2 // c.scale_factor ** 2
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return Idefics3Processor(Idefics3ImageProcessorPil.from_pretrained(folder), tokenizer, image_seq_len=seq_len,
                             chat_template=json.loads((folder / "tokenizer_config.json").read_text())["chat_template"])


# ---------------------------------------------------------------- the llama.cpp pair

def text_model(model):
    """The text half as the LlamaForCausalLM llama.cpp's converter sees (model.text_model. -> model.)."""
    from transformers import LlamaForCausalLM

    from tests.helpers.gguf_export import build_hf_model

    config = model.config.text_config
    config.tie_word_embeddings = model.config.tie_word_embeddings
    state = {("model." + k[len("model.text_model."):] if k.startswith("model.text_model.") else k): v
             for k, v in model.state_dict().items() if not k.startswith(("model.vision_model.", "model.connector."))}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    llama = build_hf_model(config, state)
    assert isinstance(llama, LlamaForCausalLM)
    return llama


def export_mmproj(model, path, ftype: str = "f32", *, longest_edge: int = 128) -> Path:
    """The vision side as llama.cpp's converter writes mmproj-*.gguf: f32, f16 or q8_0 (the
    matrices of the file type, F16 where a Q8_0 row is not whole blocks; embeddings F32)."""
    c, v = model.config, model.config.vision_config
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(c.text_config.hidden_size)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_hidden_layers)
    writer.add_vision_head_count(v.num_attention_heads)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    writer.add_vision_projector_scale_factor(c.scale_factor)
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(longest_edge)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, v.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if not hf_name.startswith(("model.vision_model.", "model.connector.")):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data = tensor.detach().float().numpy()
        qtype = GQT.F32
        if ftype != "f32" and data.ndim >= 2 and ".embeddings." not in hf_name:
            qtype = GQT.Q8_0 if ftype == "q8_0" and data.shape[-1] % 32 == 0 else GQT.F16
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def export_pair(model, folder, *, ftype: str = "f32", longest_edge: int = 128) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_path = export_gguf(text_model(model), folder / "text.gguf", ftype, tokenizer=vlm_tokenizer())
    return text_path, export_mmproj(model, folder / "mmproj.gguf", ftype, longest_edge=longest_edge)
