"""RMSNorm on the Triton path, where it is not a kernel of its own (kernels/fusions.py):

- rms_stats_triton (inv_rms of rows, for rows replaced after the embedding) against rms_stats_torch;
- the NORM prologue: qmatmul_triton(h, w, norm=(inv_rms, weight)) against
  qmatmul_torch(rms_norm_torch(h, weight)), the unfused pair;
- the RESIDUAL epilogue: add_qmatmul_triton(x, w, h) updates h in place to h + round(x @ w.T)
  and returns the new rows' inv_rms, against the same in torch.

Oracles are the torch references of the same formulas. Without CUDA the kernels run
under TRITON_INTERPRET=1.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from smollm3_triton.errors import KernelInputError  # noqa: E402
from smollm3_triton.gguf.constants import GGMLType  # noqa: E402
from smollm3_triton.kernels.qmatmul import add_qmatmul_triton, qmatmul_triton  # noqa: E402
from smollm3_triton.kernels.qtiles import prepare_tiles  # noqa: E402
from smollm3_triton.kernels.rms_norm import rms_norm_torch, rms_stats_torch, rms_stats_triton  # noqa: E402
from tests.helpers.matmul_check import check  # noqa: E402
from tests.helpers.quant_samples import oracle_matrix, random_weight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6

pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_to_nearest")


def rows(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 2048), (5, 576), (3, 100)], ids=["1x2048", "5x576", "3x100"])
def test_stats_match_reference(shape, dtype):
    h = rows(shape, dtype).to(DEVICE)
    inv = rms_stats_triton(h, EPS)
    # Only the order of the sum of squares differs: fp32 rounding.
    torch.testing.assert_close(inv.cpu(), rms_stats_torch(h, EPS).cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("m, dtype", [(1, torch.bfloat16), (6, torch.float32), (70, torch.bfloat16)])
def test_norm_prologue_is_rms_norm_then_matmul(m, dtype):
    """x = RMSNorm(h) computed while the matmul loads it: against the unfused reference pair, with the
    matmul bounds of tests/helpers/matmul_check.py (x = rms_norm_torch's output)."""
    k = 512
    w = random_weight(GGMLType.Q4_K, 72, k, seed=m)
    h = rows((m, k), dtype, seed=m)
    weight = 1 + 0.1 * torch.randn(k, generator=torch.Generator().manual_seed(1))
    x = rms_norm_torch(h, weight, EPS)[0]
    inv = rms_stats_torch(h, EPS)
    y = qmatmul_triton(h.to(DEVICE), prepare_tiles(w.to(DEVICE)), norm=(inv.to(DEVICE), weight.to(DEVICE)))
    # The kernel normalises with the same inv_rms and rounds x exactly as rms_norm_torch does, so its
    # input equals x bit for bit and the usual matmul bound applies.
    check(y, x, oracle_matrix(w), f"normed M={m}")


@pytest.mark.parametrize("qtype, m, dtype", [(GGMLType.Q4_K, 1, torch.bfloat16), (GGMLType.Q6_K, 9, torch.float32),
                                             (GGMLType.Q8_0, 70, torch.bfloat16)])
def test_residual_epilogue(qtype, m, dtype):
    """h += round(x @ w.T) in place, and the new rows' inv_rms, for decode M and a prompt's M.
    Oracle: h + x @ W.T in float64; bound: the matmul bounds, the add's rounding included (plain
    bf16: the two roundings of h + round(x @ W.bf16().T))."""
    n, k = 136, 256                                # two 64-row tiles and a partial one
    w = random_weight(qtype, n, k, seed=m)
    w64 = oracle_matrix(w)
    x = rows((m, k), dtype, seed=2 * m, scale=1.0)
    h = rows((m, n), dtype, seed=3 * m)
    h_dev = h.to(DEVICE).clone()
    out, inv = add_qmatmul_triton(x.to(DEVICE), prepare_tiles(w.to(DEVICE)), h_dev, EPS)
    assert out is h_dev
    plain = None if dtype == torch.float32 else h + x @ w64.to(dtype).T
    check(out, x, w64, f"{qtype.name} residual M={m}", ref64=h.double() + x.double() @ w64.T, plain=plain)
    torch.testing.assert_close(inv.cpu(), rms_stats_torch(out.cpu(), EPS), rtol=1e-6, atol=0)


def test_rejects_bad_arguments():
    with pytest.raises(KernelInputError, match="unit column stride"):
        rms_stats_triton(torch.randn(64, 4, device=DEVICE).T, EPS)
    w = prepare_tiles(random_weight(GGMLType.Q8_0, 64, 64).to(DEVICE))
    with pytest.raises(KernelInputError, match="residual stream must be"):
        add_qmatmul_triton(torch.randn(2, 64, device=DEVICE), w, torch.randn(3, 64, device=DEVICE), EPS)
