"""A quantized matmul's output against the float64 oracle, with the bounds the kernel tests share.

- float32 x: |y - y64| <= FP32_REL * (|x| @ |W|.T), elementwise. Any fp32 evaluation of a
  K-term dot product is within ~K * 2^-24 of that scale in the worst case and ~sqrt(K) *
  2^-24 typically (~1e-6 at K = 576). One wrong quant (an off-by-one nibble, a wrong
  scale) moves an output by >= |x_k w_k| / 8, above 1e-5 of the scale for every K used.
- bfloat16 / float16 x: the flash-attention rule. Against the float64 result on the same
  16-bit inputs, the kernel's max and RMS error are at most twice those of plain torch in
  that dtype (x @ W.to(dtype).T, output rounded to dtype).
`worst` records the largest figures seen, printed at the end of a test module.
"""
from __future__ import annotations

import torch

FP32_REL = 1e-5
LOW_PRECISION_RATIO = 2.0

worst: dict[str, float] = {}


def _record(key: str, value: float) -> None:
    worst[key] = max(worst.get(key, 0.0), value)


def check(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, label: str, *, ref64: torch.Tensor | None = None,
          plain: torch.Tensor | None = None) -> None:
    """y (kernel, any device) against x @ w64.T (or `ref64`, the float64 result of the same
    function on the same inputs); x on the CPU. `plain`: the low-precision baseline when it is
    not x @ w64.T in x's dtype."""
    y = y.cpu()
    ref = x.double() @ w64.T if ref64 is None else ref64
    assert y.dtype == x.dtype and y.shape == ref.shape, (label, y.dtype, tuple(y.shape))
    assert torch.isfinite(y).all(), label
    err = (y.double() - ref).abs()
    if x.dtype == torch.float32:
        scale = x.double().abs() @ w64.abs().T
        rel = (err / scale.clamp_min(1e-30)).max().item()
        _record("fp32 rel", rel)
        assert rel <= FP32_REL, f"{label}: error {rel:.2e} of sum|x||w| (allowed {FP32_REL})"
        return
    if plain is None:
        plain = x @ w64.to(x.dtype).T
    plain_err = (plain.double() - ref).abs()
    ratio_max = err.max().item() / plain_err.max().item()
    ratio_rms = err.pow(2).mean().sqrt().item() / plain_err.pow(2).mean().sqrt().item()
    _record(f"{str(x.dtype)[6:]} max ratio", ratio_max)
    _record(f"{str(x.dtype)[6:]} rms ratio", ratio_rms)
    assert ratio_max <= LOW_PRECISION_RATIO and ratio_rms <= LOW_PRECISION_RATIO, (
        f"{label}: error max {err.max():.3e} rms {err.pow(2).mean().sqrt():.3e}; plain torch {x.dtype} "
        f"max {plain_err.max():.3e} rms {plain_err.pow(2).mean().sqrt():.3e}")


class RecordGrids:
    """Stands in for a kernel: records each launch's grid, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]
