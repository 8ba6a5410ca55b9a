"""Images in chat messages: OpenAI content parts split into the `<image>` placeholders the
template renders and the image URLs, then each placeholder expanded into its image tokens
(as Idefics3Processor does) with the features that replace their embeddings."""
from __future__ import annotations

from ..errors import RequestError
from .encoder import VisionModel
from .image_processing import IMAGE_TOKEN, image_bytes


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
