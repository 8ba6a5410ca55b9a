"""qmatmul_triton (decode and prefill kernels on the tile layout) against an independent oracle.

Oracle: y = x @ W.T in float64, with W from gguf-py's dequantization of the same raw
blocks (tests/helpers/quant_samples.py). Bounds (tests/helpers/matmul_check.py): fp32 x
within 1e-5 of sum |x||w| elementwise; bf16 x at most twice the max and RMS error of
plain torch in bf16. Without CUDA the kernels run under TRITON_INTERPRET=1 (set before
any kernel module is imported).

Batch invariance is tested bit for bit: a row computed alone, inside batches of 2, 5,
16 and 64 rows (decode kernel) and inside a prompt of 72 rows (prefill kernel), at
different positions and beside different rows, gives the same bits.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot is numpy matmul; a BLAS thread per core on a shared machine
# makes it far slower. No effect on results.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from smollm3_triton.errors import KernelInputError, UnsupportedModelError  # noqa: E402
from smollm3_triton.gguf.constants import GGMLType  # noqa: E402
from smollm3_triton.gguf.tensors import QuantTensor, SegmentedTensor, concat_rows  # noqa: E402
from smollm3_triton.kernels import qmatmul as qm  # noqa: E402
from smollm3_triton.kernels.fusions import counters  # noqa: E402
from smollm3_triton.kernels.qmatmul import qmatmul_torch, qmatmul_triton  # noqa: E402
from smollm3_triton.kernels.qtiles import TiledTensor, TiledWeight, prepare_tiles, tiled  # noqa: E402
from tests.helpers.matmul_check import FP32_REL, RecordGrids, check, worst  # noqa: E402
from tests.helpers.quant_samples import ALL_TYPES, FLOAT_TYPES, QUANT_TYPES, oracle_matrix, random_weight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRIORITY = [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0]
# Columns per type: K-quants two 256-blocks; the legacy types SmolLM2's hidden size 576
# (9 groups of 64: a last K-slice shorter than the others); float weights 200 (not a
# multiple of 16: the last chunk is masked).
K_OF = {t: 512 for t in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)}
K_OF.update({t: 576 for t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1)})
K_OF.update({t: 200 for t in FLOAT_TYPES})


@pytest.fixture(scope="module", autouse=True)
def _print_worst_errors():
    yield
    print("\nqmatmul worst errors:", {k: f"{v:.3g}" for k, v in worst.items()})


def make_x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


def run(x: torch.Tensor, w, **kw) -> torch.Tensor:
    return qmatmul_triton(x.to(DEVICE), w, **kw)


def _sweep():
    """Priority types at every kind of M (1, one batch tile, several, 64, a prompt); the others
    at two decode M and, in turn, a prompt; fp32 and bf16 alternating."""
    cases = []
    for i, t in enumerate(ALL_TYPES):
        ms = [1, 2, 8, 9, 33, 64, 72] if t in PRIORITY else [(1, 3)[i % 2], (16, 64)[i % 2]] + [72] * (i % 3 == 0)
        for j, m in enumerate(ms):
            dtype = (torch.float32, torch.bfloat16)[(i + j) % 2]
            cases.append(pytest.param(t, m, dtype, id=f"{t.name}-M{m}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("qtype, m, dtype", _sweep())
def test_types_and_rows(qtype, m, dtype):
    n = 40 if m % 2 else 72                  # 40 and 72: no multiple of the 64-row tile
    k = K_OF[qtype]
    w = random_weight(qtype, n, k, seed=m)
    x = make_x(m, k, dtype)
    check(run(x, prepare_tiles(w.to(DEVICE))), x, oracle_matrix(w), f"{qtype.name} M={m}")


@pytest.mark.parametrize("qtype, dtype", [(GGMLType.Q4_K, torch.float32), (GGMLType.Q6_K, torch.bfloat16),
                                          (GGMLType.Q8_0, torch.bfloat16), (GGMLType.Q5_0, torch.float32),
                                          (GGMLType.F16, torch.bfloat16)], ids=lambda v: getattr(v, "name", str(v)[6:]))
def test_a_row_is_bitwise_the_same_in_any_batch(qtype, dtype):
    """Rows 0, 3 and 63 of a 64-row x, alone and inside batches of 2, 5, 16, 64 and a 72-row prompt
    (the rows around them differ from batch to batch): identical bits every time."""
    k = K_OF[qtype]
    w = prepare_tiles(random_weight(qtype, 72, k, seed=11).to(DEVICE))
    x = make_x(72, k, dtype, seed=12).to(DEVICE)
    others = make_x(72, k, dtype, seed=13).to(DEVICE)
    for r in (0, 3, 63):
        alone = qmatmul_triton(x[r:r + 1], w)[0]
        for m, at in ((2, 1), (5, 4), (16, 9), (64, 63), (72, 40)):
            batch = others[:m].clone()
            batch[at] = x[r]
            assert torch.equal(qmatmul_triton(batch, w)[at], alone), f"row {r} at {at} of a {m}-row batch"


def test_slices_partial_last_and_many():
    """K = 800 (Q8_0): 13 groups of 64, the last half empty; and K = 2048 on 8 rows: the most
    slices (1 group each, 32 slices) a weight gets."""
    w = random_weight(GGMLType.Q8_0, 40, 800, seed=3)
    x = make_x(3, 800, torch.float32)
    check(run(x, prepare_tiles(w)), x, oracle_matrix(w), "K 800")
    w = random_weight(GGMLType.Q4_K, 8, 2048, seed=4)
    assert qm.slice_groups(2048, 1, 132) == 1
    x = make_x(2, 2048, torch.bfloat16)
    check(run(x, prepare_tiles(w)), x, oracle_matrix(w), "K 2048, 32 slices")


def test_units_per_program_balance_the_busiest_sm():
    """SmolLM3-3B on 132 SMs, worked by hand: gate+up's 8 slices x 172 units. 5 units a program
    (the old rule, (8 x 172) // 264) make 280 programs, so some SM runs 3 x 5 = 15 units (+3
    programs' own code); 4 make 344, the busiest SM 3 x 4 = 12 (+3): cost 3 x 5 = 15 against
    3 x 6 = 18, and 3 (464 programs: 4 x 4 = 16), 2 (688: 6 x 3 = 18) or 1 (1,376: 11 x 2 = 22)
    cost more. down's 43 slices x 32 units: the same 4 (344 programs). QKV (16 x 24) and o
    (16 x 32) keep one unit: two would leave fewer than two programs per SM (192, 256 < 264)."""
    assert qm.units_per_program(8, 172, 132) == 4
    assert qm.units_per_program(43, 32, 132) == 4
    assert qm.units_per_program(16, 24, 132) == 1
    assert qm.units_per_program(16, 32, 132) == 1
    # Fewer (slice, unit) pairs than two per SM: one unit each, every program still busy.
    assert qm.units_per_program(4, 10, 132) == 1


@pytest.mark.parametrize("qtype, k, dtype", [(GGMLType.Q4_K, 1024, torch.float32),
                                             (GGMLType.Q6_K, 1024, torch.bfloat16),
                                             (GGMLType.Q8_0, 576, torch.bfloat16)], ids=lambda v: getattr(v, "name", v))
def test_streamed_slices(qtype, k, dtype, monkeypatch):
    """A weight not split along K, x streamed through each program a chunk at a time (the LM
    head's path on 132 SMs), made here by sizing for a 1-SM GPU: against the oracle at 1 and
    64 rows, and a row bitwise the same alone, in batches of 5 and 64 and in a 72-row prompt.
    K-quants at K 1024: x in chunks of 4 groups up to 32 rows, of 1 past them; Q8_0 at K 576
    (9 groups): chunks of 1 group."""
    monkeypatch.setattr(qm, "sm_count", lambda device: 1)
    groups = qm.slice_groups(k, 2, 1)
    assert groups == -(-k // 64) > qm.x_chunk_groups(k, groups), "the case must stream x through one slice"
    w = random_weight(qtype, 72, k, seed=7)
    tw, oracle = prepare_tiles(w.to(DEVICE)), oracle_matrix(w)
    x = make_x(1, k, dtype, seed=8).to(DEVICE)
    others = make_x(72, k, dtype, seed=9).to(DEVICE)
    alone = qmatmul_triton(x, tw)
    check(alone, x.cpu(), oracle, f"{qtype.name} streamed M=1")
    for m, at in ((5, 4), (64, 63), (72, 40)):
        batch = others[:m].clone()
        batch[at] = x[0]
        y = qmatmul_triton(batch, tw)
        assert torch.equal(y[at], alone[0]), f"streamed slices: the row at {at} of a {m}-row batch"
        if m == 64:
            check(y, batch.cpu(), oracle, f"{qtype.name} streamed M=64")


@pytest.mark.parametrize("qtype, dtype", [(GGMLType.Q4_K, torch.bfloat16), (GGMLType.Q6_K, torch.float32)],
                         ids=lambda v: getattr(v, "name", str(v)[6:]))
def test_programs_of_several_units(qtype, dtype, monkeypatch):
    """Decode programs that loop over several 64-row units of one K-slice (SmolLM3-3B's gate+up
    and down on 132 SMs take 4 each), made here by sizing for a 2-SM GPU: 3 units x 8 slices of
    4 groups -> one program per slice takes all 3 units (8 programs, 4 per SM). Against the
    oracle at 1 and 64 rows, and a row bitwise the same alone and in batches of 5 and 64."""
    monkeypatch.setattr(qm, "sm_count", lambda device: 2)
    assert qm.slice_groups(2048, 3, 2) == 4
    grids = RecordGrids(qm._qmv_kernel)
    monkeypatch.setattr(qm, "_qmv_kernel", grids)
    w = random_weight(qtype, 192, 2048, seed=40)
    tw, oracle = prepare_tiles(w.to(DEVICE)), oracle_matrix(w)
    x = make_x(1, 2048, dtype, seed=41).to(DEVICE)
    alone = qmatmul_triton(x, tw)
    assert grids.grids == [(8, 1)], "the case must give one program per slice, looping over the 3 units"
    check(alone, x.cpu(), oracle, f"{qtype.name} 3 units per program, M=1")
    others = make_x(64, 2048, dtype, seed=42).to(DEVICE)
    for m, at in ((5, 2), (64, 37)):
        batch = others[:m].clone()
        batch[at] = x[0]
        y = qmatmul_triton(batch, tw)
        assert torch.equal(y[at], alone[0]), f"several units per program: the row at {at} of a {m}-row batch"
    check(y, batch.cpu(), oracle, f"{qtype.name} 3 units per program, M=64")


def test_streamed_slices_of_a_two_type_weight(monkeypatch):
    """A fused Q4_K + Q6_K weight (QKV of a Q4_K_M file) with streamed slices: each program's
    unit picks its part's decoding inside the slice loop."""
    monkeypatch.setattr(qm, "sm_count", lambda device: 1)
    w, w64 = _fused([random_weight(GGMLType.Q4_K, 128, 512, 30), random_weight(GGMLType.Q6_K, 64, 512, 31)])
    tw = prepare_tiles(w.to(DEVICE))
    assert qm.slice_groups(512, 3, 1) > qm.x_chunk_groups(512, qm.slice_groups(512, 3, 1))
    x = make_x(16, 512, torch.float32, seed=32)
    y = run(x, tw)
    check(y, x, w64, "two-type streamed M=16")
    assert torch.equal(run(x[5:6], tw)[0], y[5])


def test_lm_head_writes_fp32():
    """out_dtype=float32: the kernel writes its fp32 sums; a bf16 activation's logits are never
    rounded to bf16 (fp32 bound, not the bf16 one)."""
    w = random_weight(GGMLType.Q6_K, 200, 256, seed=5)
    x = make_x(3, 256, torch.bfloat16)
    y = run(x, prepare_tiles(w), out_dtype=torch.float32)
    assert y.dtype == torch.float32
    check(y.cpu(), x.float(), oracle_matrix(w), "fp32 logits of bf16 x")


def _fused(parts: list[QuantTensor]):
    return concat_rows(parts), torch.cat([oracle_matrix(p) for p in parts])


@pytest.mark.parametrize("m, dtype", [(1, torch.float32), (2, torch.bfloat16), (9, torch.float32),
                                      (72, torch.bfloat16)])
def test_fused_qkv_smollm3_scaled_is_one_launch(m, dtype, monkeypatch):
    """SmolLM3's QKV at 1/8 width (8 query and 2 KV heads of 32, hidden 256; Q4_K_M gives V Q6_K):
    both types in one launch."""
    hidden = 256
    w, w64 = _fused([random_weight(GGMLType.Q4_K, 256, hidden, 10), random_weight(GGMLType.Q4_K, 64, hidden, 11),
                     random_weight(GGMLType.Q6_K, 64, hidden, 12)])
    assert isinstance(w, SegmentedTensor) and [p.qtype for p in w.parts] == [GGMLType.Q4_K, GGMLType.Q6_K]
    tw = prepare_tiles(w.to(DEVICE))
    assert isinstance(tw, TiledWeight) and [p.shape for p in tw.parts] == [(320, hidden), (64, hidden)]
    launches = []
    real = qm.launch
    monkeypatch.setattr(qm, "launch", lambda *a, **kw: (launches.append(a), real(*a, **kw)))
    x = make_x(m, hidden, dtype)
    check(run(x, tw), x, w64, f"fused QKV M={m}")
    assert len(launches) == 1


@pytest.mark.parametrize("m, dtype", [(1, torch.bfloat16), (16, torch.float32)])
def test_fused_qkv_smollm2_scaled(m, dtype):
    """SmolLM2-135M's QKV (hidden 576, 9 query / 3 KV heads) at head_dim 16: Q5_0 Q/K and a Q8_0 V
    (part A of 192 rows: three tiles, not a whole number of 64-row tiles -> two launches)."""
    hidden = 576
    w, w64 = _fused([random_weight(GGMLType.Q5_0, 144, hidden, 20), random_weight(GGMLType.Q5_0, 48, hidden, 21),
                     random_weight(GGMLType.Q8_0, 48, hidden, 22)])
    x = make_x(m, hidden, dtype)
    check(run(x, prepare_tiles(w.to(DEVICE))), x, w64, f"SmolLM2 QKV M={m}")


def test_matches_qmatmul_torch():
    for qtype, m in ((GGMLType.Q4_K, 1), (GGMLType.Q5_0, 33)):
        w = random_weight(qtype, 40, K_OF[qtype], seed=5).to(DEVICE)
        x = make_x(m, K_OF[qtype], torch.float32).to(DEVICE)
        ref = qmatmul_torch(x, w).double()
        scale = x.double().abs() @ w.dequantize().double().abs().T
        assert ((qmatmul_triton(x, prepare_tiles(w)).double() - ref).abs() / scale).max() <= FP32_REL


def test_raw_weights_are_tiled_once():
    """Unprepared weights work, and repeated calls reuse one tiling (no per-forward repack)."""
    w = concat_rows([random_weight(GGMLType.Q4_K, 32, 256, 6), random_weight(GGMLType.Q6_K, 16, 256, 7)]).to(DEVICE)
    first = tiled(w)
    assert tiled(w) is first
    x = make_x(1, 256, torch.float32)
    check(run(x, w), x, torch.cat([oracle_matrix(p) for p in w.parts]), "raw segmented")
    assert tiled(w) is first


def test_repeated_calls_agree():
    """The per-tile counters are re-armed by every launch: a second call computes the same."""
    w = prepare_tiles(random_weight(GGMLType.Q4_K, 72, 512, 9).to(DEVICE))
    x = make_x(5, 512, torch.bfloat16).to(DEVICE)
    first = qmatmul_triton(x, w)
    assert torch.equal(qmatmul_triton(x, w), first)
    assert int(counters(x.device, 0).count_nonzero()) == 0


def test_strided_activations():
    w = random_weight(GGMLType.Q4_K, 40, 256, 8)
    big = make_x(3, 300, torch.float32)
    x = big[:, :256]                          # row stride 300
    check(run(x, prepare_tiles(w.to(DEVICE))), x.contiguous(), oracle_matrix(w), "row-strided x")
    xt = make_x(256, 7, torch.float32).T      # column stride != 1
    check(run(xt, prepare_tiles(w.to(DEVICE))), xt.contiguous(), oracle_matrix(w), "transposed x")


def test_empty_batch():
    w = prepare_tiles(random_weight(GGMLType.Q8_0, 8, 64).to(DEVICE))
    assert run(torch.zeros(0, 64), w).shape == (0, 8)


# ----------------------------------------------------------------------------- the tile layout

@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_tiles_hold_the_gguf_values(qtype):
    """The tiles decode (in torch) to exactly gguf-py's values: nothing is requantized."""
    k = 576 if qtype in K_OF and K_OF[qtype] == 576 else 512
    w = random_weight(qtype, 6, k, seed=9)
    tw = prepare_tiles(w)
    assert torch.equal(tw.dequantize().double(), oracle_matrix(w))
    assert torch.equal(tw.rows(2, 5).dequantize().double(), oracle_matrix(w)[2:5])
    rows = torch.tensor([4, 0, 4])           # the embedding lookup of a tied, prepared embedding/LM head
    assert torch.equal(tw.dequantize_rows(rows, torch.float32).double(), oracle_matrix(w)[rows])
    for plane in tw.planes:
        if plane is not None:
            assert plane.stride(0) * plane.element_size() % 16 == 0 and plane.stride(1) == 1


def test_float_weights_are_not_copied():
    w = random_weight(GGMLType.BF16, 8, 64)
    tw = prepare_tiles(w)
    assert isinstance(tw, TiledTensor) and tw.qw.data_ptr() == w.data.data_ptr()
    assert prepare_tiles(tw) is tw


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_problem():
    w = prepare_tiles(random_weight(GGMLType.Q4_K, 8, 256).to(DEVICE))
    with pytest.raises(KernelInputError, match="has 128 columns"):
        run(torch.zeros(1, 128), w)
    with pytest.raises(KernelInputError, match="2-D"):
        run(torch.zeros(1, 1, 256), w)
    with pytest.raises(KernelInputError, match="float32, float16 or bfloat16"):
        run(torch.zeros(1, 256, dtype=torch.int32), w)
    with pytest.raises(UnsupportedModelError, match="Q2_K"):
        prepare_tiles(QuantTensor(torch.zeros(4, 84, dtype=torch.uint8), GGMLType.Q2_K, (4, 256)))
    with pytest.raises(UnsupportedModelError, match="not a multiple of the 256-element block"):
        prepare_tiles(QuantTensor(torch.zeros(4, 144, dtype=torch.uint8), GGMLType.Q4_K, (4, 288)))
    with pytest.raises(UnsupportedModelError, match=r"expected uint8 data \[4, 144\]"):
        prepare_tiles(QuantTensor(torch.zeros(4, 140, dtype=torch.uint8), GGMLType.Q4_K, (4, 256)))
