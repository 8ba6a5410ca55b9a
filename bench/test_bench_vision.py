"""SmolVLM's image side on the CPU: preprocessing one photo, and the vision encoder +
connector on one tile, at SmolVLM-256M-Instruct's shapes (SigLIP hidden 768, 12 layers,
12 heads, MLP 3072, 512 px tiles of 16 px patches = 1024 patches, scale 4 -> 64 tokens,
text hidden 576), random fp32 weights.

- preprocess: a 1600 x 1200 PNG decoded, resized to the 2048 px longest edge, to 4 x 3 tiles
  + the global image (13 tiles), rescaled and normalised. Baseline: transformers' Idefics3
  image processor (PIL backend) on the decoded image.
- encode: one tile through patch embedding, 12 encoder layers, post-LayerNorm, pixel
  shuffle and projection (~212 GFLOP). Baseline: transformers' get_image_features on the
  same weights (eager attention). A 13-tile image costs 13 times this.

Both run on the machine's two torch threads (bench/conftest.py); read the load average
printed with the figures.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from smollm3_triton.config import ModelConfig  # noqa: E402
from smollm3_triton.vision.encoder import VisionModel, encode_tiles  # noqa: E402
from smollm3_triton.vision.image_processing import ImageProcessorConfig, decode_image, preprocess  # noqa: E402
from smollm3_triton.vision.loader import load_hf_vision  # noqa: E402
from tests.helpers import vision_export as V  # noqa: E402

SMOLVLM_256M_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16)
ROUNDS = 3


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    model = V.random_vlm(seed=0, vision=SMOLVLM_256M_VISION, scale_factor=4,
                         text=dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64))
    return model, V.save_vlm_folder(model, tmp_path_factory.mktemp("smolvlm256m"), longest_edge=2048)


@pytest.fixture(scope="module")
def photo() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("impl", ["ours", "transformers"])
def test_preprocess(benchmark, report_figure, model_folder, photo, impl):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    _, folder = model_folder
    config = ImageProcessorConfig(longest_edge=2048, tile_size=512, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    hf = Idefics3ImageProcessorPil.from_pretrained(folder)
    if impl == "ours":
        run = lambda: preprocess(decode_image(photo), config).pixel_values  # noqa: E731
    else:
        run = lambda: hf([[decode_image(photo)]], return_tensors="pt")["pixel_values"][0]  # noqa: E731
    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert out.shape == (13, 3, 512, 512)
    report_figure(f"SmolVLM preprocess 1600x1200 PNG -> 13 tiles, {impl}: {benchmark.stats.stats.median * 1e3:.0f} ms")


@pytest.mark.parametrize("impl", ["ours", "transformers"])
def test_encode_tile(benchmark, report_figure, model_folder, impl):
    model, folder = model_folder
    tile = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    if impl == "ours":
        cfg = json.loads((folder / "config.json").read_text())
        text = ModelConfig.from_hf_config({**cfg["text_config"], "tie_word_embeddings": False})
        config, weights, processor, token = load_hf_vision(folder, cfg, text)
        vision = VisionModel(config, weights, processor, image_token_id=token, device=torch.device("cpu"),
                             dtype=torch.float32)
        run = lambda: encode_tiles(vision.config, vision.weights, tile, vision.pos_ids)  # noqa: E731
    else:
        run = lambda: model.model.get_image_features(tile[None]).pooler_output[0]  # noqa: E731
    with torch.inference_mode():
        out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert out.shape == (64, 576)
    report_figure(f"SmolVLM-256M vision encoder + connector, one 512 px tile, fp32, {impl}: "
                  f"{benchmark.stats.stats.median:.2f} s")
