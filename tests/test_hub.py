"""Hub sources resolved offline from a local cache laid out as huggingface_hub lays it
out (models--org--name/{refs/main, snapshots/<rev>/...}), with HF_HUB_OFFLINE set."""
import shutil

import pytest
from huggingface_hub import constants

from smollm3_triton import Runtime, SourceNotFoundError
from smollm3_triton.hub import quant_of, resolve
from tests.helpers.gguf_export import export_gguf, hf_logits, random_hf_model, save_hf_folder

REV = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache, repo_id: str, files: dict):
    """Put files into the cache as blobs with snapshot symlinks, like a real download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    for i, (name, src) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i:040d}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = repo / "snapshots" / REV / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return export_gguf(random_hf_model("smollm3", seed=4, num_hidden_layers=2),
                       tmp_path_factory.mktemp("m") / "tiny.gguf", "q8_0")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_quant_of_file_names():
    assert quant_of("SmolLM3-3B-Q4_K_M.gguf") == "q4_k_m"
    assert quant_of("smollm3-3b-q8_0.gguf") == "q8_0"
    assert quant_of("SmolLM3-3B-BF16.gguf") == "bf16"
    assert quant_of("SmolLM3-3B-UD-IQ2_XXS.gguf") == "iq2_xxs"
    assert quant_of("model.gguf") is None


def test_gguf_repo_picks_file_by_quant(offline_cache, tiny_gguf):
    add_to_cache(offline_cache, "unsloth/SmolLM3-3B-GGUF",
                 {"SmolLM3-3B-Q4_K_M.gguf": tiny_gguf, "SmolLM3-3B-Q8_0.gguf": tiny_gguf, "README.md": tiny_gguf})
    path = resolve("unsloth/SmolLM3-3B-GGUF", "q4_k_m")
    assert path.name == "SmolLM3-3B-Q4_K_M.gguf" and path.is_file()
    rt = Runtime.load("unsloth/SmolLM3-3B-GGUF", quant="Q8_0", device="cpu", max_seq_len=32)
    assert rt.source.name == "SmolLM3-3B-Q8_0.gguf"
    direct = Runtime.load(tiny_gguf, device="cpu", max_seq_len=32)
    ids = [1, 2, 3, 400]
    assert (rt.logits(ids) == direct.logits(ids)).all()


def test_unknown_quant_lists_available(offline_cache, tiny_gguf):
    add_to_cache(offline_cache, "org/Model-GGUF", {"Model-Q4_K_M.gguf": tiny_gguf, "Model-Q8_0.gguf": tiny_gguf})
    with pytest.raises(SourceNotFoundError, match=r"no 'q5_k_s' file; available quants: q4_k_m, q8_0"):
        Runtime.load("org/Model-GGUF", quant="q5_k_s")
    with pytest.raises(SourceNotFoundError, match="several GGUF files; choose one with quant="):
        Runtime.load("org/Model-GGUF")


def test_repo_missing_from_cache(offline_cache):
    with pytest.raises(SourceNotFoundError, match="not reachable and not in the local cache"):
        Runtime.load("org/not-there", quant="q4_k_m")


def test_safetensors_repo(offline_cache, tmp_path):
    hf = random_hf_model("llama", seed=5, num_hidden_layers=2)
    folder = save_hf_folder(hf, tmp_path / "hf")
    add_to_cache(offline_cache, "org/tiny-llama", {p.name: p for p in folder.iterdir()})
    path = resolve("org/tiny-llama")
    assert path.name == REV and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    ids = [5, 17, 300, 4000]
    ours = Runtime.load("org/tiny-llama", device="cpu", backend="torch", max_seq_len=32).logits(ids)
    ref = hf_logits(hf, ids)
    assert float(abs(ours.numpy() - ref).max() / abs(ref).max()) <= 1e-4


def test_missing_local_path():
    with pytest.raises(SourceNotFoundError, match="no such file or folder"):
        Runtime.load("./nope/model.gguf")
