"""SmolVLM / Idefics3 images: bytes -> checked PIL image -> encoder tiles, and the prompt text
that stands for them.

Equal to transformers' Idefics3 image processor (PIL backend) and Idefics3Processor:

- the image is converted to RGB (transparency composited onto white), then resized with
  LANCZOS so its longest edge is `longest_edge` (the other edge keeps the aspect ratio,
  rounded up to even), and kept under 4096 px;
- with splitting on, it is resized again so both edges are multiples of the encoder's
  `tile_size`, cut into rows x cols tiles, and a global image (the whole picture resized to
  tile_size x tile_size) follows them; an image that fits one tile is just that tile;
- pixels are rescaled by 1/255 in float64, narrowed to float32, then normalised with the
  mean/std in float32;
- in the prompt each `<image>` becomes, per tile, `<fake_token_around_image><row_r_col_c>`
  + N `<image>` (a newline after each row), then `\\n<fake_token_around_image><global-img>`
  + N `<image>` + `<fake_token_around_image>`; unsplit, only the global part without the
  leading newline. N = tokens per tile.

Every image is treated as hostile: its size is read from the header and refused above
MAX_IMAGE_PIXELS before any pixel is decoded; truncated or unreadable data and formats other
than PNG, JPEG and WebP are refused with a RequestError.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFormatError, RequestError, UnsupportedModelError

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"

FORMATS = ("PNG", "JPEG", "WEBP")
# An 8K photo is 33 Mpx; past this the request is refused before decoding, so a
# 30000 x 30000 header costs nothing.
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_BYTES = 64 << 20
# transformers' MAX_IMAGE_SIZE: no edge is resized past 4096 px.
MAX_RESIZED_EDGE = 4096
LANCZOS = 1  # PIL.Image.Resampling.LANCZOS, the value preprocessor_config.json stores


@dataclass(frozen=True)
class ImageProcessorConfig:
    longest_edge: int          # the first resize brings the longest edge here
    tile_size: int             # the encoder's input side: each tile and the global image
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_image_splitting: bool = True
    rescale_factor: float = 1 / 255

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, tile_size: int, source: str) -> ImageProcessorConfig:
        """preprocessor_config.json of an Idefics3 / SmolVLM folder; only what transformers'
        Idefics3 processor computes is accepted (LANCZOS, every step on)."""
        def fail(key, problem, error=ModelFormatError):
            return error(f"{source}: {key} {problem}")

        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(key, True) is not True:
                raise fail(key, f"is {cfg[key]!r}: only the full Idefics3 preprocessing is supported",
                           UnsupportedModelError)
        if cfg.get("resample", LANCZOS) != LANCZOS:
            raise fail("resample", f"is {cfg['resample']!r}: only LANCZOS ({LANCZOS}) is supported",
                       UnsupportedModelError)
        longest = _edge(cfg.get("size", {"longest_edge": 4 * tile_size}), "size", fail)
        tile = _edge(cfg.get("max_image_size", {"longest_edge": tile_size}), "max_image_size", fail)
        if tile != tile_size:
            raise fail("max_image_size", f"longest_edge {tile} differs from the vision encoder's image_size "
                                         f"{tile_size}")
        splitting = cfg.get("do_image_splitting", True)
        if not isinstance(splitting, bool):
            raise fail("do_image_splitting", f"must be true or false, got {splitting!r}")
        rescale = cfg.get("rescale_factor", 1 / 255)
        if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or not rescale > 0:
            raise fail("rescale_factor", f"must be a positive number, got {rescale!r}")
        return cls(longest_edge=longest, tile_size=tile_size, image_mean=_triple(cfg.get("image_mean"), "image_mean",
                                                                                  fail),
                   image_std=_triple(cfg.get("image_std"), "image_std", fail, positive=True),
                   do_image_splitting=splitting, rescale_factor=float(rescale))


def _edge(value, key, fail) -> int:
    edge = value.get("longest_edge") if isinstance(value, dict) else None
    if isinstance(edge, bool) or not isinstance(edge, int) or not 1 <= edge <= MAX_RESIZED_EDGE:
        raise fail(key, f"must be {{'longest_edge': 1..{MAX_RESIZED_EDGE}}}, got {value!r:.80}")
    return edge


def _triple(value, key, fail, positive: bool = False) -> tuple[float, ...]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)
    if not ok:
        raise fail(key, f"must be 3 finite numbers{' > 0' if positive else ''}, got {value!r:.80}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor   # [tiles, 3, tile_size, tile_size] float32: row-major tiles, then the global image
    rows: int                    # 0 and 0: not split, one (global) tile
    cols: int

    @property
    def digest(self) -> bytes:
        """What the prefix cache knows this image by: the pixels the encoder sees."""
        return hashlib.blake2b(self.pixel_values.numpy().tobytes(), digest_size=16).digest()


# ---------------------------------------------------------------- decoding

def image_bytes(url: str, where: str, local: bool = True) -> bytes:
    """The bytes behind an OpenAI image_url: a data: URL (base64), or a local file path when
    `local` (a server must not let its clients read its disk)."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: image url must be a non-empty string")
    lower = url[:16].lower()
    if lower.startswith(("http://", "https://")):
        raise RequestError(f"{where}: http(s) image URLs are not fetched (no network); pass a data: URL "
                           f"or a local path")
    if lower.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise RequestError(f"{where}: a data: URL must be data:<type>;base64,<data>")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise RequestError(f"{where}: image data is over {MAX_IMAGE_BYTES} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: the data: URL is not valid base64") from None
    if not local:
        raise RequestError(f"{where}: only data: URLs are accepted here, not local file paths")
    path = Path(url[len("file://"):] if lower.startswith("file://") else url)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise RequestError(f"{where}: {path} is {size} bytes, over the {MAX_IMAGE_BYTES}-byte image limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise RequestError(f"{where}: image file {path} does not exist") from None
    except OSError as e:
        raise RequestError(f"{where}: image file {path} cannot be read ({e.strerror or e})") from None


def decode_image(data: bytes, where: str = "image"):
    """A fully decoded RGB PIL image, or a RequestError saying what is wrong with the data."""
    try:
        from PIL import Image
    except ImportError:
        raise RequestError("images need Pillow: pip install pillow (or smollm3-triton[vision])") from None

    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(f"{where}: {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte image limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)     # reads the header only
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise RequestError(f"{where}: {width} x {height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                                   f"pixels")
            img.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:    # Pillow's own, larger limit
        raise RequestError(f"{where}: the image is over the limit of {MAX_IMAGE_PIXELS} pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise RequestError(f"{where}: not a {', '.join(FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(f"{where}: the image data is damaged or truncated ({e})") from None
    return _to_rgb(img)


def _to_rgb(img):
    """transformers' convert_to_rgb: transparency composited onto white."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------- geometry

def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The longest edge to `longest`, the other scaled and rounded up to even; then under 4096."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_RESIZED_EDGE:
        width, height = MAX_RESIZED_EDGE, int(MAX_RESIZED_EDGE / aspect)
    elif height > width and height > MAX_RESIZED_EDGE:
        height, width = MAX_RESIZED_EDGE, int(MAX_RESIZED_EDGE * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both edges up to multiples of the tile, the aspect ratio kept as transformers rounds it."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def preprocess(img, config: ImageProcessorConfig) -> ProcessedImage:
    """An RGB PIL image (decode_image's) -> the encoder's tiles."""
    from PIL import Image

    def resize(im, height: int, width: int):
        return im.resize((width, height), resample=Image.Resampling.LANCZOS)

    tile = config.tile_size
    img = resize(img, *_longest_edge_size(img.height, img.width, config.longest_edge))
    rows = cols = 0
    if config.do_image_splitting:
        img = resize(img, *_tile_multiple_size(img.height, img.width, tile))
        if img.height > tile or img.width > tile:
            rows, cols = img.height // tile, img.width // tile
            whole = np.asarray(img)
            frames = [whole[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
            frames.append(np.asarray(resize(img, tile, tile)))
        else:
            frames = [np.asarray(img)]
    else:
        frames = [np.asarray(resize(img, tile, tile))]
    pixels = np.stack(frames).transpose(0, 3, 1, 2)                     # [tiles, 3, H, W] uint8
    pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.array(config.image_mean, dtype=np.float32)[:, None, None]
    std = np.array(config.image_std, dtype=np.float32)[:, None, None]
    return ProcessedImage(torch.from_numpy(np.ascontiguousarray((pixels - mean) / std)), rows, cols)


def image_prompt(image: ProcessedImage, tokens_per_tile: int) -> str:
    """The text that replaces one `<image>` placeholder (Idefics3Processor's expansion)."""
    run = IMAGE_TOKEN * tokens_per_tile
    global_part = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{run}{FAKE_TOKEN}"
    if image.rows == 0 and image.cols == 0:
        return global_part
    text = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{run}" for c in range(image.cols)) + "\n"
                   for r in range(image.rows))
    return f"{text}\n{global_part}"
