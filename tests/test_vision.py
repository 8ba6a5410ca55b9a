"""SmolVLM (Idefics3): our processor, vision encoder, connector and whole model against
transformers on small random configs (fp32), the llama.cpp pair (text GGUF + mmproj GGUF)
against the safetensors folder, the prefix cache with images, and bad images.

Tolerances: processor outputs bit-equal; image features <= 1e-5 relative (max |ours - ref| /
max |ref|); logits <= 1e-4 relative; greedy tokens equal.
"""
import base64
import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL", reason="Pillow decodes the images (pip install pillow)")
pytest.importorskip("transformers", reason="transformers is the oracle")
from PIL import Image  # noqa: E402

from smollm3_triton import Runtime  # noqa: E402
from smollm3_triton.errors import ModelFormatError, RequestError, UnsupportedModelError  # noqa: E402
from smollm3_triton.gguf.reader import GGUFFile  # noqa: E402
from smollm3_triton.sampling_params import SamplingParams  # noqa: E402
from smollm3_triton.vision.encoder import connect, vision_encoder  # noqa: E402
from smollm3_triton.vision.image_processing import ImageProcessorConfig, decode_image, preprocess  # noqa: E402
from smollm3_triton.vision.prompt import expand_images, split_image_parts  # noqa: E402
from tests.helpers import vision_export as V  # noqa: E402


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    img = Image.fromarray(data[..., 0] if channels == 1 else data, "L" if mode == "P" else mode)
    if mode == "P":                      # a palette image whose index 0 is transparent
        img = img.convert("P")
        img.info["transparency"] = 0
    return img


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user_turn(url: str, text: str = "What is in this picture?", before: str | None = None) -> list[dict]:
    parts = ([{"type": "text", "text": before}] if before else []) + \
        [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def hf_turn(text: str = "What is in this picture?", before: str | None = None) -> list[dict]:
    parts = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def vlm():
    return V.random_vlm(seed=0)


@pytest.fixture(scope="module")
def folder(vlm, tmp_path_factory):
    return V.save_vlm_folder(vlm, tmp_path_factory.mktemp("smolvlm"))


@pytest.fixture(scope="module")
def rt(folder):
    return Runtime.load(folder, device="cpu", backend="torch", max_seq_len=512)


@pytest.fixture(scope="module")
def processor(folder, vlm):
    return V.hf_processor(folder, vlm)


def hf_inputs(processor, images, turn):
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[images], return_tensors="pt")


# ---------------------------------------------------------------- processor

# (height, width, mode): landscape and portrait (split into tiles + global), smaller than a
# tile (upscaled, then split), one exact tile, a 2 x 300 strip, transparency (composited on
# white), grey, a palette with a transparent index.
IMAGES = [(90, 150, "RGB"), (150, 90, "RGB"), (40, 33, "RGB"), (64, 64, "RGB"), (2, 300, "RGB"), (70, 120, "RGBA"),
          (50, 80, "L"), (60, 90, "P")]


@pytest.mark.parametrize("height,width,mode", IMAGES)
def test_processor_matches_transformers(rt, processor, height, width, mode):
    img = random_image(height, width, seed=height + width, mode=mode)
    data = encoded(img)
    ids, mm = rt.encode_chat(user_turn(data_url(data)))
    ref = hf_inputs(processor, [img], hf_turn())
    rows_cols = processor.image_processor([[img]], return_row_col_info=True)
    ours = preprocess(decode_image(data), rt.vision.processor)
    assert (ours.rows, ours.cols) == (rows_cols["rows"][0][0], rows_cols["cols"][0][0])
    assert torch.equal(ours.pixel_values, ref["pixel_values"][0])
    assert ids == ref["input_ids"][0].tolist()
    assert sum(e.shape[0] for _, e, _ in mm) == ids.count(V.image_token_id())


def test_processor_without_splitting(vlm, tmp_path):
    """do_image_splitting false: one tile of the whole image, prompt without row/col markers."""
    folder = V.save_vlm_folder(vlm, tmp_path, do_image_splitting=False)
    processor = V.hf_processor(folder, vlm)
    cfg = ImageProcessorConfig.from_preprocessor_config(
        __import__("json").loads((folder / "preprocessor_config.json").read_text()), 64, "test")
    img = random_image(90, 150)
    ours = preprocess(img, cfg)
    ref = processor.image_processor([[img]], return_tensors="pt")
    assert (ours.rows, ours.cols) == (0, 0)
    assert torch.equal(ours.pixel_values, ref["pixel_values"][0])


def test_text_template_takes_image_inline(rt, processor, tmp_path):
    """A template that wants string content (SmolLM2's): image parts become `<image>` in the
    joined text, expanded and tokenized as transformers' processor does that text."""
    from smollm3_triton.chat import render_chat
    from tests.helpers.gguf_export import smollm2_tokenizer

    img = random_image(90, 150, seed=5)
    url = data_url(encoded(img))
    messages, urls = split_image_parts(user_turn(url, before="Look:"), takes_parts=False)
    assert messages[0]["content"] == "Look:\n<image>\nWhat is in this picture?"
    text = render_chat(smollm2_tokenizer()["tokenizer.chat_template"], messages)
    ids, _ = expand_images(rt.vision, text, urls, rt.tokenizer.encode)
    assert ids == processor(text=[text], images=[[img]], return_tensors="pt")["input_ids"][0].tolist()


# ---------------------------------------------------------------- encoder, connector, model

@pytest.mark.parametrize("case", ["siglip-4x4-scale2", "siglip-25x25-scale5"])
def test_image_features_match_transformers(case, tmp_path):
    """A 25 x 25 patch grid is one where transformers' bucketized position ids are not the
    identity (llama.cpp's are)."""
    kwargs = {} if case == "siglip-4x4-scale2" else dict(vision=dict(image_size=50, patch_size=2), scale_factor=5)
    vlm = V.random_vlm(seed=3, **kwargs)
    tile = vlm.config.vision_config.image_size
    folder = V.save_vlm_folder(vlm, tmp_path, longest_edge=2 * tile)
    runtime = Runtime.load(folder, device="cpu", backend="torch", max_seq_len=64, kv_cache_tokens=64)
    processor = V.hf_processor(folder, vlm)
    img = random_image(100, 70, seed=9)
    ref_inputs = processor.image_processor([[img]], return_tensors="pt")
    with torch.no_grad():
        ref = vlm.model.get_image_features(ref_inputs["pixel_values"],
                                           ref_inputs["pixel_attention_mask"]).pooler_output[0]
    vision = runtime.vision
    pixels = vision.load_image(encoded(img)).pixel_values
    with torch.no_grad():
        ref_encoder = vlm.model.vision_model(pixel_values=ref_inputs["pixel_values"][0]).last_hidden_state
    encoder = vision_encoder(vision.config, vision.weights, pixels, vision.pos_ids)
    ours = connect(vision.config, vision.weights, encoder)
    errs = rel_err(encoder, ref_encoder), rel_err(ours, ref)
    print(f"{case}: vision encoder max rel error {errs[0]:.2e}, after the connector {errs[1]:.2e}")
    assert encoder.shape == ref_encoder.shape and ours.shape == ref.shape
    assert max(errs) <= 1e-5
    assert torch.equal(vision.features(vision.load_image(encoded(img))), ours)
    identity = torch.arange(vision.config.patches_per_side ** 2)
    assert torch.equal(vision.pos_ids, identity) == (case == "siglip-4x4-scale2")


def test_logits_and_greedy_tokens_match_transformers(rt, vlm, processor):
    img = random_image(90, 150, seed=1)
    ids, mm = rt.encode_chat(user_turn(data_url(encoded(img))))
    ref_inputs = hf_inputs(processor, [img], hf_turn())
    with torch.no_grad():
        ref = vlm(**ref_inputs).logits[0]
        ref_tokens = vlm.generate(**ref_inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(ids):]
    err = rel_err(rt.logits(ids, mm), ref)
    print(f"image + text prompt of {len(ids)} tokens: logits max rel error {err:.2e}")
    assert err <= 1e-4
    tokens = list(rt.generate_ids(ids, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True), mm))
    assert tokens == ref_tokens.tolist()
    # Runtime.chat takes the same content parts and gives the same text.
    assert rt.chat(user_turn(data_url(encoded(img))), max_new_tokens=8, temperature=0, ignore_eos=True).text == \
        rt.tokenizer.decode(tokens)


def test_smolvlm2_class_matches_transformers(vlm, processor, tmp_path):
    """SmolVLMForConditionalGeneration (SmolVLM2): the same tensors under model_type smolvlm.
    Its processor expands `<image>` with the same code as Idefics3's (SmolVLMProcessor itself
    needs num2words for video), so the prompt ids come from the Idefics3 processor and the
    pixels from SmolVLM's image processor."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    smolvlm = V.as_smolvlm(vlm)
    folder = V.save_vlm_folder(smolvlm, tmp_path)
    runtime = Runtime.load(folder, device="cpu", backend="torch", max_seq_len=256, kv_cache_tokens=256)
    img = random_image(100, 70, seed=14)
    ids, mm = runtime.encode_chat(user_turn(data_url(encoded(img))))
    pixels = SmolVLMImageProcessorPil.from_pretrained(folder)([[img]], return_tensors="pt")
    ref_inputs = hf_inputs(processor, [img], hf_turn())
    assert ids == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = smolvlm(input_ids=ref_inputs["input_ids"], attention_mask=ref_inputs["attention_mask"],
                      pixel_values=pixels["pixel_values"], pixel_attention_mask=pixels["pixel_attention_mask"]).logits[0]
    assert rel_err(runtime.logits(ids, mm), ref) <= 1e-4


def test_chunked_prefill_splits_images(folder, vlm, processor):
    """A step budget of 8 tokens cuts the prompt's image runs across prefill chunks (and
    tiles across blocks); the answer is still transformers'."""
    runtime = Runtime.load(folder, device="cpu", backend="torch", max_seq_len=256, kv_cache_tokens=512,
                           max_num_batched_tokens=8)
    img = random_image(90, 150, seed=17)
    ids, mm = runtime.encode_chat(user_turn(data_url(encoded(img))))
    assert any(off % 8 + e.shape[0] > 8 for off, e, _ in mm)          # some run straddles a chunk boundary
    ref_inputs = hf_inputs(processor, [img], hf_turn())
    with torch.no_grad():
        ref = vlm.generate(**ref_inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(ids):]
    tokens = list(runtime.generate_ids(ids, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True), mm))
    assert tokens == ref.tolist()


def test_batched_chat_with_images(rt):
    """Runtime.chat over a list of conversations (one engine batch) answers each as alone."""
    turns = [user_turn(data_url(encoded(random_image(90, 150, seed=s)))) for s in (18, 19)]
    together = rt.chat(turns, max_new_tokens=5, temperature=0)
    assert [r.text for r in together] == [rt.chat(t, max_new_tokens=5, temperature=0).text for t in turns]
    assert together[0].text != together[1].text


def test_two_images_in_one_prompt(rt, vlm, processor):
    a, b = random_image(90, 150, seed=2), random_image(64, 64, seed=3)
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(encoded(a))}},
                                         {"type": "text", "text": "and"},
                                         {"type": "image_url", "image_url": {"url": data_url(encoded(b, "JPEG"),
                                                                                             "image/jpeg")}}]}]
    ids, mm = rt.encode_chat(turn)
    b_decoded = Image.open(io.BytesIO(encoded(b, "JPEG")))
    ref_inputs = hf_inputs(processor, [a, b_decoded], [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}])
    assert ids == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = vlm(**ref_inputs).logits[0]
    assert rel_err(rt.logits(ids, mm), ref) <= 1e-4


# ---------------------------------------------------------------- the llama.cpp pair

@pytest.fixture(scope="module")
def pair(vlm, tmp_path_factory):
    return V.export_pair(vlm, tmp_path_factory.mktemp("pair"))


def test_gguf_pair_matches_folder(rt, pair):
    text_gguf, mmproj = pair
    from_gguf = Runtime.load(text_gguf, mmproj=mmproj, device="cpu", backend="torch", max_seq_len=512)
    # GGUF stores the epsilon as float32
    g, f = from_gguf.vision.config, rt.vision.config
    assert dataclasses.replace(g, layer_norm_eps=f.layer_norm_eps) == f
    assert g.layer_norm_eps == pytest.approx(f.layer_norm_eps, rel=1e-6)
    assert from_gguf.vision.processor == rt.vision.processor
    turn = user_turn(data_url(encoded(random_image(90, 150, seed=4))))
    ids, mm = from_gguf.encode_chat(turn)
    ref_ids, ref_mm = rt.encode_chat(turn)
    assert ids == ref_ids
    assert [(o, h) for o, _, h in mm] == [(o, h) for o, _, h in ref_mm]
    feat_err = rel_err(torch.cat([e for _, e, _ in mm]), torch.cat([e for _, e, _ in ref_mm]))
    logit_err = rel_err(from_gguf.logits(ids, mm), rt.logits(ref_ids, ref_mm))
    print(f"GGUF pair vs folder: features {feat_err:.2e}, logits {logit_err:.2e}")
    assert feat_err <= 1e-6 and logit_err <= 1e-5


@pytest.mark.parametrize("ftype,tolerance", [("f16", 5e-3), ("q8_0", 3e-2)])
def test_f16_and_q8_0_mmproj(rt, vlm, tmp_path, ftype, tolerance):
    """The f16 mmproj llama.cpp's converter writes by default (F16 matrices, F32 embeddings),
    and a Q8_0 one (F16 where a row is not a multiple of 32)."""
    text_gguf, _ = V.export_pair(vlm, tmp_path)
    mmproj = V.export_mmproj(vlm, tmp_path / f"mmproj-{ftype}.gguf", ftype)
    assert {GGUFFile(mmproj).tensors["mm.model.fc.weight"].qtype.name} == {ftype.upper()}
    from_gguf = Runtime.load(text_gguf, mmproj=mmproj, device="cpu", backend="torch", max_seq_len=256)
    image = rt.vision.load_image(encoded(random_image(90, 150, seed=6)))
    err = rel_err(from_gguf.vision.features(image), rt.vision.features(image))
    print(f"{ftype} mmproj: image features max rel error {err:.2e} against fp32")
    assert err <= tolerance


def test_mmproj_refusals(rt, vlm, pair, tmp_path):
    import gguf

    text_gguf, mmproj = pair
    with pytest.raises(RequestError, match="mmproj= goes with a text GGUF"):
        Runtime.load(rt.source, mmproj=mmproj, device="cpu", backend="torch", max_seq_len=64)
    with pytest.raises(ModelFormatError, match="general.architecture"):
        Runtime.load(text_gguf, mmproj=text_gguf, device="cpu", backend="torch", max_seq_len=64)
    # An mmproj of another projector type, and one for a text model of another width.
    reader = gguf.GGUFReader(str(mmproj))
    for key, value, error, match in [
            ("clip.projector_type", "gemma3", UnsupportedModelError, "projector_type"),
            ("clip.vision.projection_dim", 96, ModelFormatError, "projection_dim")]:
        path = tmp_path / f"{key}.gguf"
        writer = gguf.GGUFWriter(str(path), "clip")
        for field in reader.fields.values():
            name = field.name
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            v = value if name == key else field.contents()
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                writer.add_array(name, v)
            else:
                writer.add_key_value(name, v, vtype)
        for t in reader.tensors:
            writer.add_tensor(t.name, np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(error, match=match):
            Runtime.load(text_gguf, mmproj=path, device="cpu", backend="torch", max_seq_len=64)


def test_text_model_refuses_images(pair):
    """The text GGUF alone is a text model: image parts are refused by name, text parts work."""
    text_only = Runtime.load(pair[0], device="cpu", backend="torch", max_seq_len=128)
    assert text_only.vision is None
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[0\].*only text parts"):
        text_only.encode_chat(user_turn("data:image/png;base64,AAAA"))
    ids, mm = text_only.encode_chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert mm == [] and ids == text_only.tokenizer.encode(text_only.render_chat([{"role": "user", "content": "Hi"}]))


@pytest.mark.llama_cpp
def test_llama_cpp_runs_the_pair(vlm, tmp_path):
    """llama.cpp (libmtmd through llama-cpp-python) loads our pair and its image embeddings
    equal ours. A tile-sized image with preproc_image_size = tile: transformers keeps it one
    tile, llama.cpp makes it one slice + the overview, both the unresized pixels."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp", reason="this llama-cpp-python has no mtmd bindings")
    text_gguf, mmproj = V.export_pair(vlm, tmp_path, longest_edge=64)
    ours_rt = Runtime.load(text_gguf, mmproj=mmproj, device="cpu", backend="torch", max_seq_len=128)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = ours_rt.vision.features(preprocess(Image.fromarray(pixels), ours_rt.vision.processor))

    llm = llama_cpp.Llama(str(text_gguf), n_ctx=128, n_threads=2, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup = False, 2, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, "mtmd_init_from_file refused the mmproj"
    bitmap = mtmd.mtmd_bitmap_init(64, 64, (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes()))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        assert mtmd.mtmd_support_vision(ctx)
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        images = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * 64,))
                images.append(torch.from_numpy(out.copy()).view(n, 64))
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
    assert len(images) == 2                        # the slice and the overview
    errs = [rel_err(ours, theirs) for theirs in images]
    print(f"llama.cpp mtmd image embeddings vs ours: max rel error {max(errs):.2e}")
    # ggml's CPU GELU reads an fp16 table: a few 1e-4 relative
    assert max(errs) <= 1e-3


# ---------------------------------------------------------------- prefix cache with images

def test_prefix_cache_keeps_images_apart(folder, vlm, processor):
    """Two images behind the same placeholder tokens share only the blocks before them; the
    same image again hits its own blocks; each answer equals transformers'."""
    runtime = Runtime.load(folder, device="cpu", backend="torch", max_seq_len=256, kv_cache_tokens=1024)
    before = "Please look carefully at the following picture and describe every detail of it"
    a, b = random_image(90, 150, seed=7), random_image(90, 150, seed=8)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    outs = {}
    for name, img in (("a", a), ("b", b), ("a again", a)):
        ids, mm = runtime.encode_chat(user_turn(data_url(encoded(img)), before=before))
        [result] = runtime.engine.run([(ids, params, mm)])
        outs[name] = (ids, mm, result)
    ids_a, mm_a, _ = outs["a"]
    assert outs["b"][0] == ids_a                          # the same token ids ...
    first_image = mm_a[0][0]
    bs = runtime.engine.block_size
    assert first_image >= bs                              # ... and at least one block before the image
    assert outs["b"][2][-1].num_cached_tokens == first_image // bs * bs
    assert outs["a again"][2][-1].num_cached_tokens == (len(ids_a) - 1) // bs * bs
    for name, img in (("b", b), ("a again", a)):
        ref_inputs = hf_inputs(processor, [img], hf_turn(before=before))
        with torch.no_grad():
            ref = vlm.generate(**ref_inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, len(ids_a):]
        assert [t for o in outs[name][2] for t in o.token_ids] == ref.tolist(), name


# ---------------------------------------------------------------- bad images

def png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height: signature, IHDR and the start of an IDAT chunk (valid
    CRCs), the pixels never sent."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))


BAD_IMAGES = [
    ("truncated png", data_url(encoded(random_image(90, 150))[:300]), "damaged or truncated"),
    ("30000x30000 header", data_url(png_header(30000, 30000)), "over the limit of 64000000 pixels"),
    ("9000x8000 header", data_url(png_header(9000, 8000)), "9000 x 8000 pixels is over the limit"),
    ("not an image", data_url(b"just some text, not pixels"), "not a PNG, JPEG, WEBP image"),
    ("gif", data_url(encoded(random_image(8, 8), "GIF"), "image/gif"), "not a PNG, JPEG, WEBP image"),
    ("bad base64", "data:image/png;base64,@@@@", "not valid base64"),
    ("http url", "https://example.com/cat.png", "no network"),
    ("missing file", "/nonexistent/cat.png", "does not exist"),
]


@pytest.mark.parametrize("url,match", [pytest.param(url, match, id=case) for case, url, match in BAD_IMAGES])
def test_bad_images_are_refused(rt, url, match):
    with pytest.raises(RequestError, match=match) as info:
        rt.encode_chat(user_turn(url))
    assert "messages[0].content[0]" in str(info.value)
    with pytest.raises(RequestError, match=match):
        rt.chat(user_turn(url), max_new_tokens=2)
    stats = rt.engine.stats()
    assert not rt.engine.has_unfinished() and stats.running == stats.waiting == 0
    assert stats.free_blocks == stats.num_blocks


def test_image_from_a_local_path(rt, tmp_path):
    path = tmp_path / "cat.webp"
    random_image(60, 80, seed=11).save(path, "WEBP", lossless=True)
    ids_path, mm_path = rt.encode_chat(user_turn(str(path)))
    ids_file, mm_file = rt.encode_chat(user_turn(f"file://{path}"))
    assert ids_file == ids_path and [h for *_, h in mm_file] == [h for *_, h in mm_path]
    ids_url, mm_url = rt.encode_chat(user_turn(data_url(path.read_bytes(), "image/webp")))
    assert ids_path == ids_url and [h for *_, h in mm_path] == [h for *_, h in mm_url]


def test_placeholder_in_text_is_refused(rt):
    with pytest.raises(RequestError, match="placeholders for 1 images"):
        rt.encode_chat(user_turn(data_url(encoded(random_image(64, 64))), text="a literal <image> here"))


# ---------------------------------------------------------------- CLI

def test_cli_generate_with_image(rt, folder, pair, tmp_path, capsys, monkeypatch):
    from smollm3_triton.cli import main

    path = tmp_path / "cat.png"
    random_image(90, 150, seed=12).save(path)
    expected = rt.chat(user_turn(str(path), text="Describe it."), max_new_tokens=5, temperature=0).text
    common = ["--backend", "torch", "--image", str(path), "-p", "Describe it.", "-n", "5", "--temperature", "0"]
    for model in (["--model", str(folder)], ["--model", str(pair[0]), "--mmproj", str(pair[1])]):
        assert main(["generate", *model, *common]) == 0
        assert capsys.readouterr().out == expected + "\n"
    # chat: the image goes with the first message, one line of stdin
    monkeypatch.setattr("sys.stdin", io.StringIO("Describe it.\n"))
    assert main(["chat", "--model", str(folder), *common[:4], "-n", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--model", str(folder), "--backend", "torch", "--image", str(tmp_path / "none.png"),
                 "-p", "x", "-n", "2"]) == 1
    assert "none.png does not exist" in capsys.readouterr().err


def test_cli_inspect_shows_the_vision_side(folder, pair, capsys):
    from smollm3_triton.cli import main

    for source in (folder, pair[1]):
        assert main(["inspect", str(source)]) == 0
        out = capsys.readouterr().out
        assert "vision:\n  hidden_size: 32\n" in out and "  tokens_per_tile: 4\n" in out, out


# ---------------------------------------------------------------- server

def test_server_chat_takes_image_parts(rt, folder, tmp_path):
    """The OpenAI chat endpoint with an image_url part answers as Runtime.chat does."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from tests.helpers.serve_util import running_server

    url = data_url(encoded(random_image(90, 150, seed=13)))
    expected = rt.chat(user_turn(url), max_new_tokens=6, temperature=0).text
    load = lambda: Runtime.load(folder, device="cpu", backend="torch", max_seq_len=512)  # noqa: E731
    with running_server(load) as (base, _):
        body = {"model": "tiny", "messages": user_turn(url), "max_tokens": 6, "temperature": 0}
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
        bad = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                         json={**body, "messages": user_turn(data_url(b"not an image"))})
        assert bad.status_code == 400 and "not a PNG, JPEG, WEBP image" in bad.text, bad.text
        path = tmp_path / "local.png"
        random_image(8, 8).save(path)
        local = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={**body, "messages": user_turn(str(path))})
        assert local.status_code == 400 and "only data: URLs are accepted here" in local.text, local.text


def test_folder_refusals(vlm, tmp_path):
    """Inconsistent SmolVLM folders are refused by name before any image is seen."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    base = V.save_vlm_folder(vlm, tmp_path / "base")

    def variant(name, edit_json=None, edit_tensors=None):
        folder = tmp_path / name
        shutil.copytree(base, folder)
        if edit_json:
            file, change = edit_json
            data = json.loads((folder / file).read_text())
            change(data)
            (folder / file).write_text(json.dumps(data))
        if edit_tensors:
            tensors = load_file(folder / "model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    (base / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))    # consistent: loads
    cases = [
        (variant("seq_len", ("processor_config.json", lambda d: d.update(image_seq_len=64))),
         ModelFormatError, "image_seq_len 64 differs from the 4 tokens per tile"),
        (variant("tile", ("preprocessor_config.json", lambda d: d.update(max_image_size={"longest_edge": 32}))),
         ModelFormatError, "max_image_size longest_edge 32 differs from the vision encoder's image_size 64"),
        (variant("resample", ("preprocessor_config.json", lambda d: d.update(resample=3))),
         UnsupportedModelError, "resample"),
        (variant("token", ("config.json", lambda d: d.update(image_token_id=5))),
         ModelFormatError, "image_token_id 5 is not the tokenizer's <image> token"),
        (variant("act", ("config.json", lambda d: d["vision_config"].update(hidden_act="relu"))),
         UnsupportedModelError, "vision_config.hidden_act"),
        (variant("scale", ("config.json", lambda d: d.update(scale_factor=3))),
         ModelFormatError, "do not divide by the scale_factor 3"),
        (variant("missing", edit_tensors=lambda t: t.pop("model.vision_model.post_layernorm.bias")),
         ModelFormatError, "vision tensor model.vision_model.post_layernorm.bias is missing"),
        (variant("extra", edit_tensors=lambda t: t.update({"model.vision_model.encoder.layers.2.mlp.fc1.bias":
                                                             torch.zeros(48)})),
         ModelFormatError, "unexpected vision tensor model.vision_model.encoder.layers.2.mlp.fc1.bias"),
    ]
    for folder, error, match in cases:
        with pytest.raises(error, match=match):
            Runtime.load(folder, device="cpu", backend="torch", max_seq_len=64)
    assert Runtime.load(base, device="cpu", backend="torch", max_seq_len=64).vision.config.tokens_per_tile == 4


def test_processor_chat_template_file(vlm, processor, tmp_path):
    """SmolVLM folders keep the template in the processor's chat_template.json, not in
    tokenizer_config.json."""
    import json

    folder = V.save_vlm_folder(vlm, tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": cfg.pop("chat_template")}))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    runtime = Runtime.load(folder, device="cpu", backend="torch", max_seq_len=128, kv_cache_tokens=128)
    img = random_image(64, 64, seed=15)
    ids, _ = runtime.encode_chat(user_turn(data_url(encoded(img))))
    assert ids == hf_inputs(processor, [img], hf_turn())["input_ids"][0].tolist()


def test_bfloat16_vision(rt, folder):
    """The CUDA default dtype: the encoder runs in bf16 as the text model does; its features
    stay within bf16 rounding of the fp32 ones."""
    runtime = Runtime.load(folder, device="cpu", backend="torch", dtype="bfloat16", max_seq_len=128,
                           kv_cache_tokens=128)
    image = rt.vision.load_image(encoded(random_image(90, 150, seed=16)))
    ours = runtime.vision.features(image)
    assert ours.dtype == torch.bfloat16
    err = rel_err(ours, rt.vision.features(image))
    print(f"bf16 image features: max rel error {err:.2e} against fp32")
    assert err <= 3e-2
    ids, mm = runtime.encode_chat(user_turn(data_url(encoded(random_image(90, 150, seed=16)))))
    assert list(runtime.generate_ids(ids, SamplingParams(max_new_tokens=2, temperature=0), mm))
