"""dequantize() against gguf-py's numpy dequantization, bit for bit.

Blocks are random bytes, except that every fp16 (or bf16/f32) field gets a
random *finite* value (any sign, subnormals and zero included), so results
hold no NaN/inf and can be compared exactly. "Exact" here is stricter than
torch.equal: the float32 bit patterns must match, so -0.0 vs 0.0 would fail.
"""
from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from smollm3_triton.errors import GGUFError, UnsupportedModelError
from smollm3_triton.gguf.constants import BLOCK_SIZES, SUPPORTED_TYPES, GGMLType
from smollm3_triton.gguf.dequant import dequantize
from smollm3_triton.gguf.tensors import QuantTensor

QUANT_TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
               GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
ALL_TYPES = QUANT_TYPES + [GGMLType.F32, GGMLType.F16, GGMLType.BF16]

# Byte offsets of the fp16 fields in one block (ggml-common.h): d, and dmin/m where present.
FP16_FIELDS = {
    GGMLType.Q8_0: [0], GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2],
    GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
    GGMLType.Q4_K: [0, 2], GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208],
}

SHAPES = [  # (leading dims, blocks per row)
    ((), 1),
    ((1,), 1),
    ((33,), 3),
    ((2, 3), 2),
]


def _finite_bits(rng: np.random.Generator, shape, dtype, exp_mask: int, clear_bit: int) -> np.ndarray:
    """Random bit patterns with an all-ones exponent (inf/NaN) knocked down to a finite one."""
    info = np.iinfo(dtype)
    u = rng.integers(0, int(info.max) + 1, size=shape, dtype=dtype)
    return np.where((u & exp_mask) == exp_mask, u & ~dtype(clear_bit), u).astype(dtype)


def random_rows(qtype: GGMLType, lead: tuple[int, ...], n_blocks: int, seed: int) -> np.ndarray:
    """uint8 [*lead, n_blocks * block_bytes] of valid, finite blocks."""
    rng = np.random.default_rng(seed)
    _, nbytes = BLOCK_SIZES[qtype]
    shape = (*lead, n_blocks * nbytes)
    if qtype == GGMLType.F32:
        return _finite_bits(rng, (*lead, n_blocks), np.uint32, 0x7F800000, 0x40000000).view(np.uint8).reshape(shape)
    if qtype == GGMLType.F16:
        return _finite_bits(rng, (*lead, n_blocks), np.uint16, 0x7C00, 0x4000).view(np.uint8).reshape(shape)
    if qtype == GGMLType.BF16:
        return _finite_bits(rng, (*lead, n_blocks), np.uint16, 0x7F80, 0x4000).view(np.uint8).reshape(shape)
    blocks = rng.integers(0, 256, size=(*lead, n_blocks, nbytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = _finite_bits(rng, (*lead, n_blocks, 1), np.uint16, 0x7C00, 0x4000)
        blocks[..., off:off + 2] = d.view(np.uint8)
    return blocks.reshape(shape)


def reference(arr: np.ndarray, qtype: GGMLType) -> torch.Tensor:
    ref = gguf_dequantize(np.ascontiguousarray(arr), GGMLQuantizationType[qtype.name])
    return torch.from_numpy(np.array(ref, dtype=np.float32))


def assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ref).all()
    a, b = ours.cpu().view(torch.int32), ref.view(torch.int32)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        worst = (ours.cpu() - ref).abs().max().item()
        raise AssertionError(f"{len(bad)} of {a.numel()} values differ (first at {bad[0].tolist()}, max |diff| {worst})")


def test_block_table_matches_gguf_py():
    for qtype in ALL_TYPES:
        assert BLOCK_SIZES[qtype] == GGML_QUANT_SIZES[GGMLQuantizationType[qtype.name]]
    assert set(ALL_TYPES) == SUPPORTED_TYPES


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("lead,n_blocks", SHAPES, ids=lambda v: str(v))
def test_matches_gguf_py_bit_for_bit(qtype, lead, n_blocks):
    arr = random_rows(qtype, lead, n_blocks, seed=zlib.crc32(f"{qtype.name}{lead}{n_blocks}".encode()))
    ours = dequantize(torch.from_numpy(arr), qtype)
    assert_bit_equal(ours, reference(arr, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_non_contiguous_slices(qtype):
    _, nbytes = BLOCK_SIZES[qtype]
    arr = random_rows(qtype, (8,), 4, seed=int(qtype) + 100)
    t = torch.from_numpy(arr)
    # every other row; then whole blocks 1..2 of each row (a column slice whose
    # start is one block in, an offset not aligned to 4 for Q5_0/Q5_1's qh)
    for ours_in, ref_in in [(t[1::2], arr[1::2]),
                            (t[:, nbytes:3 * nbytes], arr[:, nbytes:3 * nbytes]),
                            (t[1::3, nbytes:], arr[1::3, nbytes:])]:
        assert not ours_in.is_contiguous()
        assert_bit_equal(dequantize(ours_in, qtype), reference(ref_in, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_read_only_memmap_at_odd_offset(qtype, tmp_path):
    _, nbytes = BLOCK_SIZES[qtype]
    arr = random_rows(qtype, (5,), 2, seed=int(qtype) + 200)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x00" + arr.tobytes())  # one pad byte: the tensor starts at an odd byte
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert not mm.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        whole = torch.from_numpy(mm)
    data = whole[1:].view(arr.shape)
    assert data.storage_offset() == 1
    ours = dequantize(data, qtype)
    assert_bit_equal(ours, reference(arr, qtype))
    assert_bit_equal(dequantize(data[::2], qtype), reference(arr[::2], qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quant_tensor_dequantize_rows(qtype):
    elems, _ = BLOCK_SIZES[qtype]
    rows, cols = 6, 3 * elems
    arr = random_rows(qtype, (rows,), 3, seed=int(qtype) + 300)
    qt = QuantTensor(torch.from_numpy(arr), qtype, (rows, cols))
    for index in [torch.tensor([5, 0, 5, 2]), torch.tensor([[1, 4], [3, 3], [0, 5]])]:
        ours = qt.dequantize_rows(index)
        assert_bit_equal(ours, reference(arr[index.numpy()], qtype))
    assert_bit_equal(qt.dequantize(), reference(arr, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_empty(qtype):
    elems, nbytes = BLOCK_SIZES[qtype]
    out = dequantize(torch.empty((0, 2 * nbytes), dtype=torch.uint8), qtype)
    assert out.shape == (0, 2 * elems) and out.dtype == torch.float32


@pytest.mark.parametrize("qtype", sorted(set(GGMLType) - SUPPORTED_TYPES), ids=lambda t: t.name)
def test_unsupported_type_is_named(qtype):
    _, nbytes = BLOCK_SIZES[qtype]
    with pytest.raises(UnsupportedModelError, match=rf"\b{qtype.name}\b"):
        dequantize(torch.zeros((1, nbytes), dtype=torch.uint8), qtype)


def test_unknown_type_number_is_named():
    with pytest.raises(UnsupportedModelError, match="unknown type 99"):
        dequantize(torch.zeros((1, 32), dtype=torch.uint8), 99)


def test_bad_data_is_refused():
    with pytest.raises(GGUFError, match=r"Q4_K rows of 100 bytes are not whole blocks of 144 bytes"):
        dequantize(torch.zeros((2, 100), dtype=torch.uint8), GGMLType.Q4_K)
    with pytest.raises(GGUFError, match=r"uint8.*torch\.float16"):
        dequantize(torch.zeros((2, 18), dtype=torch.float16), GGMLType.Q4_0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_matches_gguf_py(qtype):
    _, nbytes = BLOCK_SIZES[qtype]
    arr = random_rows(qtype, (64,), 8, seed=int(qtype) + 400)
    t = torch.from_numpy(arr).cuda()
    ours = dequantize(t, qtype)
    assert ours.is_cuda
    assert_bit_equal(ours, reference(arr, qtype))
    sliced = dequantize(t[1::3, nbytes:5 * nbytes], qtype)
    assert_bit_equal(sliced, reference(arr[1::3, nbytes:5 * nbytes], qtype))
    elems, _ = BLOCK_SIZES[qtype]
    if qtype in QUANT_TYPES:
        qt = QuantTensor(t, qtype, (64, 8 * elems))
        index = torch.tensor([63, 0, 7, 7], device="cuda")
        assert_bit_equal(qt.dequantize_rows(index), reference(arr[[63, 0, 7, 7]], qtype))
