"""`smollm3 inspect`: what a GGUF file or a safetensors folder holds (architecture, config,
NoPE layers, tokenizer, vision side, every tensor's type and shape), read from headers only."""
from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path

from ..errors import SmolLMError

HELP = "architecture, config, tokenizer and tensors of a model file"
DESCRIPTION = "Print what a GGUF file or safetensors folder holds, without loading weights."


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help=".gguf file, model folder or hub repo id")
    p.add_argument("--quant", help="which GGUF of a folder or hub repo")


def run(args) -> int:
    from .. import hub

    path = hub.resolve(args.file, args.quant)
    if path.is_dir():
        return _inspect_folder(path)
    return _inspect_gguf(path)


def _print_config(config) -> None:
    print("config:")
    for f in dataclasses.fields(config):
        if f.name in ("use_rope", "extra"):
            continue
        print(f"  {f.name}: {getattr(config, f.name)}")
    nope = [i for i, rope in enumerate(config.use_rope) if not rope]
    print(f"  nope_layers: {nope if nope else 'none (RoPE on every layer)'}")


def _print_tensors(rows: list[tuple[str, str, tuple[int, ...]]], unsupported: set[str]) -> None:
    print(f"tensors ({len(rows)}; shape in torch order, rows first):")
    width = max((len(name) for name, _, _ in rows), default=0)
    for name, kind, shape in rows:
        mark = "  (not supported)" if kind in unsupported else ""
        print(f"  {name:<{width}}  {kind:<5}  {list(shape)}{mark}")
    counts = Counter(kind for _, kind, _ in rows)
    print("tensor types: " + ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


def _inspect_gguf(path: Path) -> int:
    from ..config import ModelConfig
    from ..gguf.constants import SUPPORTED_TYPES, type_name
    from ..gguf.reader import GGUFFile
    from ..vision.encoder import VisionConfig

    with GGUFFile(path) as g:
        md = g.metadata
        print(f"file: {path} ({g.size} bytes)")
        print(f"format: GGUF v{g.version}, {len(md)} metadata keys, {len(g.tensors)} tensors")
        print(f"architecture: {md.get('general.architecture')}")
        if md.get("general.name") is not None:
            print(f"name: {md['general.name']}")
        problem = config = None
        try:
            if md.get("general.architecture") == "clip":      # an mmproj: a vision side, no text model
                config = None
                _print_vision(VisionConfig.from_mmproj_metadata(md, str(path)))
            else:
                config = ModelConfig.from_gguf_metadata(md, str(path))
        except SmolLMError as e:
            problem = e
            print(f"config: cannot be built: {e}")
        if config is not None:
            # As the loader decides: no output.weight means the head is the embedding.
            config = dataclasses.replace(config, tie_word_embeddings="output.weight" not in g.tensors)
            _print_config(config)
        _print_gguf_tokenizer(md)
        rows = [(info.name, type_name(info.qtype), info.shape) for info in g.tensors.values()]
        unsupported = {type_name(info.qtype) for info in g.tensors.values() if info.qtype not in SUPPORTED_TYPES}
        _print_tensors(rows, unsupported)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def _print_vision(vision) -> None:
    print("vision:")
    for f in dataclasses.fields(vision):
        print(f"  {f.name}: {getattr(vision, f.name)}")
    print(f"  tokens_per_tile: {vision.tokens_per_tile}")


def _print_gguf_tokenizer(md: dict) -> None:
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        print("tokenizer: none in the file")
        return

    def token(key: str) -> str:
        i = md.get(key)
        if not isinstance(i, int):
            return "none"
        return f"{i} {tokens[i]!r}" if 0 <= i < len(tokens) else f"{i} (out of range)"

    template = md.get("tokenizer.chat_template")
    print("tokenizer:")
    print(f"  model: {md.get('tokenizer.ggml.model')}, pre: {md.get('tokenizer.ggml.pre')}")
    print(f"  vocab: {len(tokens)} tokens, {len(md.get('tokenizer.ggml.merges') or [])} merges")
    print(f"  bos: {token('tokenizer.ggml.bos_token_id')}, eos: {token('tokenizer.ggml.eos_token_id')}, "
          f"pad: {token('tokenizer.ggml.padding_token_id')}")
    print(f"  chat template: {f'{len(template)} characters' if isinstance(template, str) else 'none'}")


def _inspect_folder(path: Path) -> int:
    import json

    from safetensors import safe_open

    from ..config import ModelConfig, hf_text_config, is_hf_vision_language
    from ..errors import ModelFormatError
    from ..tokenizer import Tokenizer

    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path}: expected a JSON object")
    files = sorted(path.glob("*.safetensors"))
    print(f"folder: {path} ({len(files)} safetensors files)")
    print(f"architecture: {', '.join(cfg.get('architectures') or []) or cfg.get('model_type')}")
    config = ModelConfig.from_hf_config(*hf_text_config(cfg, str(cfg_path)))
    _print_config(config)
    if is_hf_vision_language(cfg):
        from ..vision.encoder import VisionConfig

        _print_vision(VisionConfig.from_hf_config(cfg, config.hidden_size, str(cfg_path)))
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_hf_folder(path)

        def token(i):
            return "none" if i is None else f"{i} {tok.token_bytes(i).decode('utf-8', 'replace')!r}"

        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        print("tokenizer:")
        print(f"  model: {(spec.get('model') or {}).get('type')}, pre: {(spec.get('pre_tokenizer') or {}).get('type')}")
        print(f"  vocab: {tok.vocab_size} tokens")
        print(f"  bos: {token(tok.bos_id)}, eos: {token(tok.eos_id)}, pad: {token(tok.pad_id)}")
        print(f"  chat template: {f'{len(tok.chat_template)} characters' if tok.chat_template else 'none'}")
    else:
        print("tokenizer: none (no tokenizer.json)")
    rows = []
    for f in files:
        try:
            with safe_open(f, "pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    rows.append((name, sl.get_dtype(), tuple(sl.get_shape())))
        except Exception as e:  # the safetensors library raises its own error types on a bad header
            raise ModelFormatError(f"{f}: not a valid safetensors file ({e})") from None
    _print_tensors(rows, set())
    return 0
