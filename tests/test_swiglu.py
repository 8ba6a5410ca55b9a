"""gate_up_swiglu_triton (gate and up tiles in one launch, SwiGLU in its epilogue) against an independent oracle.

Oracle: silu(x @ Wg.T) * (x @ Wu.T) in float64, W from gguf-py's dequantization
(tests/quant_samples.py). Without CUDA the kernels run under TRITON_INTERPRET=1.

Tolerances:
- float32 x: the matmul bound of tests/test_qmatmul.py (1e-5 of S = |x| @ |W|.T)
  carried through the activation: |d(silu(g) u)| <= 1.1 |u| |dg| + |silu(g)| |du|
  (|silu'| < 1.1, |silu(g)| <= |g|), plus 1e-6 |y| for the fp32 sigmoid and
  products. Observed errors sit far below it.
- bfloat16 x: at most twice the max and RMS error of plain torch in bf16
  (silu(x @ Wg.bf16().T) * (x @ Wu.bf16().T), every step in bf16).
"""
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from smollm3_triton.errors import KernelInputError  # noqa: E402
from smollm3_triton.gguf.constants import GGMLType  # noqa: E402
from smollm3_triton.gguf.tensors import SegmentedTensor, concat_rows  # noqa: E402
from smollm3_triton.kernels.qtiles import prepare_tiles, tiled  # noqa: E402
from smollm3_triton.kernels.swiglu import gate_up_swiglu_torch, gate_up_swiglu_triton  # noqa: E402
from tests.helpers.matmul_check import RecordGrids  # noqa: E402
from tests.helpers.quant_samples import oracle_matrix, random_weight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_REL = 1e-5


def make_x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)


def run(x, w, **kw):
    with warnings.catch_warnings():
        # The interpreter evaluates sigmoid with numpy, which warns when exp(-g) overflows
        # to inf for very negative g; 1 / (1 + inf) = 0 is the right limit.
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
        return gate_up_swiglu_triton(x.to(DEVICE), w, **kw).cpu()


def check(y: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, label: str) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], wg.shape[0])
    assert torch.isfinite(y).all()
    xd = x.double()
    g, u = xd @ wg.T, xd @ wu.T
    ref = torch.nn.functional.silu(g) * u
    err = (y.double() - ref).abs()
    if x.dtype == torch.float32:
        sg, su = xd.abs() @ wg.abs().T, xd.abs() @ wu.abs().T
        bound = FP32_REL * (1.1 * u.abs() * sg + g.abs() * su) + 1e-6 * ref.abs()
        assert (err <= bound).all(), f"{label}: worst error / bound {(err / bound).max():.3g}"
    else:
        gb, ub = x @ wg.to(x.dtype).T, x @ wu.to(x.dtype).T
        plain_err = ((torch.nn.functional.silu(gb) * ub).double() - ref).abs()
        for stat in (lambda e: e.max(), lambda e: e.pow(2).mean().sqrt()):
            assert stat(err) <= 2 * stat(plain_err), (
                f"{label}: error max {err.max():.3e} rms {err.pow(2).mean().sqrt():.3e}; plain torch bf16 max "
                f"{plain_err.max():.3e} rms {plain_err.pow(2).mean().sqrt():.3e}")


def gate_up(gate_type, up_type, inter, k, seed=0):
    gate, up = random_weight(gate_type, inter, k, seed), random_weight(up_type, inter, k, seed + 1)
    return concat_rows([gate, up]), oracle_matrix(gate), oracle_matrix(up)


@pytest.mark.parametrize("gate_type, up_type, k, m, dtype", [
    # SmolLM3 at 1/8 width (hidden 256, intermediate 768 -> 96 here): one Q4_K matrix.
    (GGMLType.Q4_K, GGMLType.Q4_K, 256, 1, torch.float32),
    (GGMLType.Q4_K, GGMLType.Q4_K, 256, 33, torch.bfloat16),
    # Mixed-type halves (separate parts of one weight).
    (GGMLType.Q4_K, GGMLType.Q6_K, 512, 2, torch.bfloat16),
    (GGMLType.Q6_K, GGMLType.Q4_K, 256, 7, torch.float32),
    # SmolLM2-135M (hidden 576) as its Q4_K_M file stores it: Q5_0 and Q8_0.
    (GGMLType.Q5_0, GGMLType.Q8_0, 576, 1, torch.bfloat16),
    (GGMLType.Q8_0, GGMLType.Q8_0, 576, 16, torch.float32),
    (GGMLType.Q4_1, GGMLType.Q5_1, 288, 4, torch.float32),
    (GGMLType.Q5_K, GGMLType.Q4_0, 256, 128, torch.bfloat16),
    (GGMLType.F16, GGMLType.BF16, 200, 3, torch.bfloat16),
    (GGMLType.F32, GGMLType.F32, 200, 33, torch.float32),
], ids=lambda v: v.name if isinstance(v, GGMLType) else str(v).replace("torch.", ""))
def test_gate_up_swiglu(gate_type, up_type, k, m, dtype):
    w, wg, wu = gate_up(gate_type, up_type, 96, k)
    if gate_type != up_type:
        assert isinstance(w, SegmentedTensor)
    x = make_x(m, k, dtype)
    check(run(x, prepare_tiles(w.to(DEVICE))), x, wg, wu, f"{gate_type.name}/{up_type.name} M={m}")


@pytest.mark.parametrize("m", [1, 7])
def test_parts_not_aligned_with_the_halves(m):
    """Parts of 24 and 56 rows with I = 40: the launch is cut at 24 and at 40 - 24 = 16."""
    a, b = random_weight(GGMLType.Q4_K, 24, 256, 30), random_weight(GGMLType.Q6_K, 56, 256, 31)
    w = SegmentedTensor((a, b))
    full = torch.cat([oracle_matrix(a), oracle_matrix(b)])
    x = make_x(m, 256, torch.float32)
    check(run(x, prepare_tiles(w.to(DEVICE))), x, full[:40], full[40:], f"unaligned parts M={m}")


def test_raw_weights_and_prompts():
    """An unprepared weight (tiled on first use), at a decode M and at a prompt's M (the prefill kernel)."""
    w, wg, wu = gate_up(GGMLType.Q4_K, GGMLType.Q6_K, 40, 512, seed=5)
    x = make_x(3, 512, torch.float32)
    check(run(x, w.to(DEVICE)), x, wg, wu, "raw weight, M=3")
    assert tiled(w) is tiled(w)
    x = make_x(72, 512, torch.bfloat16)
    check(run(x, w.to(DEVICE)), x, wg, wu, "prompt of 72 rows")


def test_a_row_is_bitwise_the_same_in_any_batch():
    """Row 2 alone, in a batch of 16 and in a prompt of 72 rows: the same bits."""
    w = prepare_tiles(gate_up(GGMLType.Q4_K, GGMLType.Q4_K, 64, 256, seed=8)[0].to(DEVICE))
    x = make_x(72, 256, torch.bfloat16)
    alone = run(x[2:3], w)[0]
    assert torch.equal(run(x[:16], w)[2], alone)
    assert torch.equal(run(x, w)[2], alone)


def test_streamed_slices(monkeypatch):
    """Gate+up not split along K, x streamed a chunk at a time and shared by the gate and up
    tiles (sized here for a 1-SM GPU, K 1024: one slice of 16 groups, x in chunks of 4):
    against the oracle, and row 2 bitwise the same alone, in 16 rows and in a prompt."""
    from smollm3_triton.kernels import qmatmul, swiglu
    for module in (qmatmul, swiglu):
        monkeypatch.setattr(module, "sm_count", lambda device: 1)
    assert qmatmul.slice_groups(1024, 2, 1) == 16
    w, wg, wu = gate_up(GGMLType.Q4_K, GGMLType.Q4_K, 96, 1024, seed=9)
    w = prepare_tiles(w.to(DEVICE))
    x = make_x(72, 1024, torch.bfloat16)
    alone = run(x[2:3], w)
    check(alone, x[2:3], wg, wu, "streamed M=1")
    batch = run(x[:16], w)
    check(batch, x[:16], wg, wu, "streamed M=16")
    assert torch.equal(batch[2], alone[0])
    assert torch.equal(run(x, w)[2], alone[0])


def test_programs_of_several_units(monkeypatch):
    """Gate+up programs looping over several units of one K-slice (SmolLM3-3B's take 4 on 132
    SMs), sized here for a 2-SM GPU: 3 gate/up tile pairs x 8 slices of 4 groups -> one
    program per slice takes all 3. Against the oracle at 1 and 16 rows, row 2 bitwise the same in both."""
    from smollm3_triton.kernels import qmatmul, swiglu
    for module in (qmatmul, swiglu):
        monkeypatch.setattr(module, "sm_count", lambda device: 2)
    assert qmatmul.slice_groups(2048, 3, 2) == 4 and qmatmul.x_chunk_groups(2048, 4) == 4
    grids = RecordGrids(qmatmul._qmv_kernel)
    monkeypatch.setattr(qmatmul, "_qmv_kernel", grids)
    w, wg, wu = gate_up(GGMLType.Q4_K, GGMLType.Q4_K, 192, 2048, seed=12)
    w = prepare_tiles(w.to(DEVICE))
    x = make_x(16, 2048, torch.bfloat16)
    alone = run(x[2:3], w)
    assert grids.grids == [(8, 1)], "the case must give one program per slice, looping over the 3 units"
    check(alone, x[2:3], wg, wu, "3 units per program, M=1")
    batch = run(x, w)
    check(batch, x, wg, wu, "3 units per program, M=16")
    assert torch.equal(batch[2], alone[0])


def test_matches_gate_up_swiglu_torch():
    pytest.importorskip("smollm3_triton.gguf.dequant")
    w, _, _ = gate_up(GGMLType.Q4_K, GGMLType.Q6_K, 40, 256, seed=7)
    w = w.to(DEVICE)
    x = make_x(2, 256, torch.float32).to(DEVICE)
    ref = gate_up_swiglu_torch(x, w).cpu()
    assert torch.allclose(run(x, prepare_tiles(w)), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_bad_inputs_name_the_problem():
    odd = prepare_tiles(random_weight(GGMLType.Q8_0, 5, 64).to(DEVICE))
    with pytest.raises(KernelInputError, match="odd number of rows"):
        run(torch.zeros(1, 64), odd)
    w = prepare_tiles(random_weight(GGMLType.Q8_0, 8, 64).to(DEVICE))
    with pytest.raises(KernelInputError, match="has 32 columns"):
        run(torch.zeros(1, 32), w)
