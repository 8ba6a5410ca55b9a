"""rms_norm_triton (residual add + RMSNorm) against rms_norm_torch.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (smollm3_triton.kernels sets it
before any kernel is decorated).
"""
import pytest
import torch

from smollm3_triton.errors import KernelInputError
from smollm3_triton.kernels.rms_norm import rms_norm_torch, rms_norm_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6


pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_to_nearest")


def tol(dtype):
    # fp32: only the order of the sum of squares differs. bf16: both round the same
    # fp32 formula, so at most one rounding step apart (2^-7 relative at worst).
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("shape", [(1, 2048), (5, 576), (2, 3, 100)], ids=["1x2048", "5x576", "2x3x100"])
def test_matches_reference(shape, with_residual, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE)
    residual = torch.randn(shape, generator=g).to(dtype).to(DEVICE) if with_residual else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE)      # fp32, as GGUF stores norms
    y_ref, h_ref = rms_norm_torch(x, weight, EPS, residual)
    y, h = rms_norm_triton(x, weight, EPS, residual)
    assert y.shape == x.shape and y.dtype == x.dtype and h.dtype == h_ref.dtype
    # h is one add rounded once, on both sides: bit-exact.
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    if residual is None:
        assert h is x
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    print(f"rms_norm {shape} residual={with_residual} {dtype}: worst abs err "
          f"{(y.float() - y_ref.float()).abs().max().item():.3g}")


def test_mixed_dtypes_and_strided_rows():
    """bf16 activations with an fp32 residual stream (h comes back fp32, as torch
    promotes) and x a row-strided view."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 2 * 960, generator=g).to(torch.bfloat16).to(DEVICE)
    x = base[:, :960]
    residual = torch.randn(4, 960, generator=g).to(DEVICE)
    weight = torch.randn(960, generator=g).to(torch.bfloat16).to(DEVICE)
    y_ref, h_ref = rms_norm_torch(x, weight, EPS, residual)
    y, h = rms_norm_triton(x, weight, EPS, residual)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, **tol(torch.bfloat16))


def test_rejects_bad_arguments():
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(KernelInputError, match="weight"):
        rms_norm_triton(x, torch.ones(63, device=DEVICE), EPS)
    with pytest.raises(KernelInputError, match="residual"):
        rms_norm_triton(x, torch.ones(64, device=DEVICE), EPS, torch.randn(3, 64, device=DEVICE))
